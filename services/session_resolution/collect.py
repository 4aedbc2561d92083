"""The ``collect`` block: what the widget should ask before chat and what it may prefill, and
validation of the extra fields a browser sends back. Pure rules over the widget token's
settings (``shared.identity.widget_tokens.WidgetSettings``); no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.session_resolution.identity import EMAIL_MAX, NAME_MAX, Attribute, Scalar, is_email
from services.session_resolution.schemas import CollectFieldOut, CollectOut
from shared.errors import validation_failed
from shared.identity.widget_tokens import ExtraField, WidgetSettings

_BUILT_IN = (
    CollectFieldOut(name="name", label="Name", type="text", required=True, max_length=NAME_MAX),
    CollectFieldOut(name="email", label="Email", type="email", required=True, max_length=EMAIL_MAX),
)


def validate_fields(
    fields: Mapping[str, Scalar] | None, settings: WidgetSettings
) -> dict[str, Scalar]:
    """The browser's extra fields checked against the configured ones: only configured names,
    each of its type and within its maxLength. Every problem is listed in one 422."""
    if not fields:
        return {}
    configured = {f.name: f for f in settings.extra_data_collection_fields}
    errors: list[dict[str, str]] = []
    accepted: dict[str, Scalar] = {}
    for name, value in fields.items():
        spec = configured.get(name)
        if spec is None:
            errors.append({"field": f"fields.{name}", "message": "not a configured field"})
            continue
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "":
            continue  # "not answered" is not an answer to store
        problem = _field_problem(spec, value)
        if problem is not None:
            errors.append({"field": f"fields.{name}", "message": problem})
            continue
        accepted[name] = value
    if errors:
        allowed = ", ".join(sorted(configured)) or "none"
        raise validation_failed(
            f"the extra fields do not match this widget's configuration (configured: {allowed})",
            errors=errors,
        )
    return accepted


def _field_problem(spec: ExtraField, value: Scalar) -> str | None:
    if spec.type == "boolean":
        return None if isinstance(value, bool) else "must be true or false"
    if spec.type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else "must be a number"
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > spec.max_length:
        return f"at most {spec.max_length} characters"
    if not value.isprintable():
        return "printable characters only"
    if spec.type == "email" and not is_email(value):
        return "not an email address"
    return None


def collect_block(settings: WidgetSettings, attributes: Mapping[str, Attribute]) -> CollectOut:
    """Ask only what is not known yet; prefill only what the settings allow and is known."""
    ask: list[CollectFieldOut] = []
    if settings.collect_user_data:
        ask.extend(f for f in _BUILT_IN if f.name not in attributes)
        ask.extend(
            CollectFieldOut(
                name=f.name,
                label=f.label,
                type=f.type,
                required=f.required,
                max_length=f.max_length,
            )
            for f in settings.extra_data_collection_fields
            if f.name not in attributes
        )
    prefill: dict[str, str] = {}
    wanted = settings.prefill_user_data
    for key, allowed in (("name", wanted.name), ("email", wanted.email)):
        known = attributes.get(key)
        if allowed and known is not None and isinstance(known.value, str):
            prefill[key] = known.value
    return CollectOut(collect_user_data=settings.collect_user_data, ask=ask, prefill=prefill)
