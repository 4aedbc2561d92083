-- The org policy's token lifetime limit takes the contract's name, maxTokenLifetime (it was
-- stored as tokenMaxTtlSeconds). The code still reads the old name, so this only keeps the
-- stored documents canonical. Owner: token issuance (orgs).
UPDATE orgs
SET policy = (policy - 'tokenMaxTtlSeconds')
             || jsonb_build_object('maxTokenLifetime', policy -> 'tokenMaxTtlSeconds')
WHERE policy ? 'tokenMaxTtlSeconds';
