-- Erasure blanks the externalId of a person's unapplied login merge requests, by contact and
-- by the browsers bound to them: indexes so that is a lookup, not a scan of every request.
-- Owner: session resolution (merge_requests).
CREATE INDEX merge_requests_contact ON merge_requests (contact_id);
CREATE INDEX merge_requests_visitor ON merge_requests (visitor_id);
