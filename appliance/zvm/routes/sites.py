"""The local site (and, with pairing, the peer sites and the virtualization inventory)."""
from __future__ import annotations

import time

from ..service import API_VERSION, VERSION


def local_site(zvm) -> dict:
    kind = zvm.cfg.site_kind
    return {
        "siteIdentifier": zvm.site_id,
        "link": zvm.site_link(), "siteName": zvm.cfg.site_name, "location": zvm.cfg.site_location,
        "version": VERSION, "displayVersion": VERSION, "zvmApiVersion": API_VERSION,
        "contactEmail": "", "contactName": "", "contactPhone": "",
        "isReplicationToSelfEnabled": True,
        "utcOffsetInMinutes": int(-time.timezone / 60),
        "siteType": "VCenter" if kind == "vsphere" else "SCVMM",
        "ipAddress": zvm.cfg.public_host or zvm.cfg.listen_host,
        "bandwidthThrottlingInMBs": 0,
        "siteTypeVersion": "", "platformInformation": None,
        "isLoginBannerEnabled": False, "loginBanner": "",
    }


def register(api, zvm):
    @api.route("GET", "/v1/localsite", "This site", response="LocalSiteApi")
    def localsite(req):
        return local_site(zvm)
