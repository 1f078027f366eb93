"""VRAs: install on a host, status, edit, upgrade, uninstall."""
from __future__ import annotations

from .. import vra_ops  # noqa: F401 - registers the VRA operations
from ..schema import BOOL, INT, STR, obj
from ..vras import IP_CONFIG_TYPES, VRA_STATUSES, VrasService

NETWORK = obj(vraIPConfigurationTypeApi=STR, vraIPAddress=STR, vraIPAddressRangeEnd=STR,
              subnetMask=STR, defaultGateway=STR)


def register(api, zvm):
    vras = zvm.services.setdefault("vras", VrasService(zvm))

    api.schema("VraNetworkDataApi", NETWORK)
    api.schema("VraCreateDataApi", obj(
        ("hostIdentifier", "datastoreIdentifier", "networkIdentifier"),
        hostIdentifier=STR, datastoreIdentifier=STR, networkIdentifier=STR, hostRootPassword=STR,
        memoryInGb=INT, groupName=STR, vraNetworkDataApi=NETWORK,
        usePublicKeyInsteadOfCredentials=BOOL, populatePostInstallation=BOOL, numOfCpus=INT,
        vmInstanceType=STR))
    api.schema("VraEditDataApi", obj(
        hostRootPassword=STR, groupName=STR, usePublicKeyInsteadOfCredentials=BOOL,
        vraNetworkDataApi=NETWORK, memoryInGb=INT, numOfCpus=INT))

    @api.route("GET", "/v1/vras", "VRAs of this site", response="[VraApi]", query={
        "vraName": STR, "status": STR, "vraVersion": STR, "hostVersion": STR, "ipAddress": STR,
        "vraGroup": STR, "datastoreName": STR, "datastoreClusterName": STR, "networkName": STR,
        "vraIpConfigurationTypeApi": STR})
    def list_vras(req):
        q = {k: str(v).lower() for k, v in req.query.items()}
        out = []
        for doc in vras.list():
            v = vras.vra_api(doc)
            fields = {"vraName": v["vraName"], "vraVersion": v["vraVersion"],
                      "hostVersion": v["hostVersion"], "vraGroup": v["vraGroup"],
                      "datastoreName": v["datastoreName"], "networkName": v["networkName"],
                      "datastoreClusterName": v["datastoreClusterName"] or "",
                      "ipAddress": v["vraNetworkDataApi"]["vraIPAddress"],
                      "vraIpConfigurationTypeApi":
                          v["vraNetworkDataApi"]["vraIPConfigurationTypeApi"]}
            if any(k in q and q[k] != str(val).lower() for k, val in fields.items()):
                continue
            if "status" in q and q["status"] not in (str(v["status"]),
                                                     VRA_STATUSES[v["status"]].lower()):
                continue
            out.append(v)
        return out

    @api.route("POST", "/v1/vras", "Install a VRA on a host (deploys the tidemark-vra appliance)",
               body="VraCreateDataApi", response="string")
    def install(req):
        return vras.install(req.body, user=req.user)["identifier"]

    @api.route("GET", "/v1/vras/statuses", "VRA status names (the integer is the position)",
               response="[string]")
    def statuses(req):
        return VRA_STATUSES

    @api.route("GET", "/v1/vras/ipconfigurationtypes", "VRA IP configuration types",
               response="[string]")
    def ipconfigurationtypes(req):
        return IP_CONFIG_TYPES

    @api.route("GET", "/v1/vras/{vraIdentifier}", "One VRA", response="VraApi")
    def get_vra(req, vraIdentifier):
        return vras.vra_api(vras.get(vraIdentifier))

    @api.route("PUT", "/v1/vras/{vraIdentifier}", "Change a VRA's settings (applied to the "
               "appliance at its next upgrade)", body="VraEditDataApi", response="string")
    def edit(req, vraIdentifier):
        return vras.edit(vraIdentifier, req.body, user=req.user)["identifier"]

    @api.route("DELETE", "/v1/vras/{vraIdentifier}", "Uninstall a VRA (409 while VPGs use it)",
               response="string")
    def uninstall(req, vraIdentifier):
        return vras.uninstall(vraIdentifier, user=req.user)["identifier"]

    @api.route("POST", "/v1/vras/{vraIdentifier}/upgrade", "Redeploy the VRA appliance at this "
               "ZVM's version, keeping its journal and state", response="string")
    def upgrade(req, vraIdentifier):
        return vras.upgrade(vraIdentifier, user=req.user)["identifier"]
