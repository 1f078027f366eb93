"""OVF environment documents: how an appliance VM receives its settings.

vSphere hands a powered-on appliance its OVF properties as an OVF environment
XML document (through the ISO transport or guestinfo.ovfEnv); the simulator
writes the same document into a file. Property keys are the ones declared in
the appliance's OVF descriptor (``packer/``), e.g. ``role``, ``zvm_url``,
``api_token``.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

OVF_ENV_NS = "http://schemas.dmtf.org/ovf/environment/1"
SECRET_HINTS = ("password", "secret", "token", "key")


class OvfEnvError(ValueError):
    """The OVF environment document is not valid: {0}"""


def render(properties: dict[str, str], vm_id: str = "", kind: str = "Tidemark simulator") -> str:
    props = "\n".join(f'    <Property oe:key={quoteattr(str(k))} oe:value={quoteattr(str(v))}/>'
                      for k, v in sorted(properties.items()))
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Environment xmlns="{OVF_ENV_NS}" xmlns:oe="{OVF_ENV_NS}" oe:id={quoteattr(vm_id)}>\n'
            f'  <PlatformSection>\n    <Kind>{kind}</Kind>\n    <Locale>en</Locale>\n'
            f'  </PlatformSection>\n  <PropertySection>\n{props}\n  </PropertySection>\n'
            f'</Environment>\n')


def parse(text: str) -> dict[str, str]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise OvfEnvError(f"not XML: {exc}") from exc
    if root.tag != f"{{{OVF_ENV_NS}}}Environment":
        raise OvfEnvError(f"root element is {root.tag}, not an OVF Environment")
    out = {}
    for prop in root.iter(f"{{{OVF_ENV_NS}}}Property"):
        key = prop.get(f"{{{OVF_ENV_NS}}}key")
        if not key:
            raise OvfEnvError("a Property has no oe:key")
        out[key] = prop.get(f"{{{OVF_ENV_NS}}}value", "")
    return out


def redacted(properties: dict[str, str]) -> dict[str, str]:
    """Properties with secret values hidden, for logs and status pages."""
    return {k: ("***" if any(h in k.lower() for h in SECRET_HINTS) else v)
            for k, v in properties.items()}
