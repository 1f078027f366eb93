"""Request validation and response spelling.

Request bodies are read case-insensitively (``HostName``, ``hostName`` and ``hostname`` are
one field) and validated against a small JSON-Schema subset before a view sees them: a
malformed body is a 400 problem naming the field, never an exception inside a view. The same
schemas go into the OpenAPI document (``openapi.py``), so the document and the validation
cannot disagree.

Responses are spelled in PascalCase, as the reference API does: ``pascal(doc)``.
"""
from __future__ import annotations

from .errors import BadRequest

# -- schema constructors (plain JSON Schema dicts)


def obj(required: tuple[str, ...] = (), **props) -> dict:
    s = {"type": "object", "properties": props, "additionalProperties": True}
    if required:
        s["required"] = list(required)
    return s


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
ANY = {}


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


def enum(*values) -> dict:
    return {"type": "integer" if all(isinstance(v, int) for v in values) else "string",
            "enum": list(values)}


def nullable(s: dict) -> dict:
    return {**s, "nullable": True}


_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
          "object": (dict,), "array": (list,)}


def validate(value, schema: dict, where: str = "body"):
    """Check ``value`` against ``schema`` and return it with object keys in the schema's spelling.
    Unknown keys are kept as sent (clients send extra fields; they are ignored)."""
    if value is None:
        if schema.get("nullable") or not schema:
            return None
        if schema.get("type"):
            raise BadRequest(f"{where} must be a {schema['type']}, not null")
    t = schema.get("type")
    if t:
        ok = _TYPES[t]
        if not isinstance(value, ok) or (t in ("integer", "number") and isinstance(value, bool)):
            if t == "number" and isinstance(value, int) and not isinstance(value, bool):
                pass
            else:
                raise BadRequest(f"{where} must be a{'n' if t[0] in 'aeiou' else ''} {t}")
    if "enum" in schema and value not in schema["enum"]:
        raise BadRequest(f"{where} must be one of {schema['enum']}")
    if t == "integer" and not (-2**63 <= value < 2**63):
        raise BadRequest(f"{where} is out of range")
    if t == "object":
        props = schema.get("properties", {})
        lower = {k.lower(): k for k in props}
        out = {}
        for k, v in value.items():
            canon = lower.get(str(k).lower())
            if canon is None:
                out[k] = v
                continue
            if canon in out:
                raise BadRequest(f"{where}.{canon} is given twice")
            out[canon] = validate(v, props[canon], f"{where}.{canon}")
        for r in schema.get("required", ()):
            if out.get(r) is None:
                raise BadRequest(f"{where}.{r} is required")
        return out
    if t == "array":
        items = schema.get("items", {})
        return [validate(v, items, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def get_ci(d: dict, name: str, default=None):
    """A field of a request dict, by any spelling."""
    if name in d:
        return d[name]
    low = name.lower()
    for k, v in d.items():
        if str(k).lower() == low:
            return v
    return default


def pascal(doc):
    """Recursively spell the keys of a response in PascalCase (``vpgIdentifier`` -> ``VpgIdentifier``);
    keys starting with ``_`` are internal and left out."""
    if isinstance(doc, dict):
        return {(k[:1].upper() + k[1:]): pascal(v) for k, v in doc.items()
                if not str(k).startswith("_")}
    if isinstance(doc, list):
        return [pascal(v) for v in doc]
    return doc
