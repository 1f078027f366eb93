"""/v1/vpgSettings: create, edit and commit VPG settings (VpgSettingsApi and its sections)."""
from __future__ import annotations

from ..schema import BOOL, INT, STR, arr, nullable, obj
from ..vpgsettings import VpgSettings

S, I, B = nullable(STR), nullable(INT), nullable(BOOL)


def _schemas(api) -> None:
    lim = obj(hardLimitInMB=I, hardLimitInPercent=I, warningThresholdInMB=I,
              warningThresholdInPercent=I)
    api.schema("VpgSettingsJournalLimitationApi", lim)
    store_section = obj(limitation=nullable(lim), datastoreIdentifier=S, datastoreClusterIdentifier=S)
    api.schema("VpgSettingsBasicApi", obj(
        name=S, vpgType=S, rpoInSeconds=I, testIntervalInMinutes=I, journalHistoryInHours=I,
        priority=S, useWanCompression=B, serviceProfileIdentifier=S, zorgIdentifier=S,
        protectedSiteIdentifier=S, recoverySiteIdentifier=S))
    api.schema("VpgSettingsJournalApi", store_section)
    api.schema("VpgSettingsScratchApi", store_section)
    api.schema("VpgSettingsRecoveryApi", obj(
        defaultHostIdentifier=S, defaultHostClusterIdentifier=S, defaultDatastoreIdentifier=S,
        defaultDatastoreClusterIdentifier=S, defaultFolderIdentifier=S, resourcePoolIdentifier=S))
    net = obj(hypervisor=nullable(obj(defaultNetworkIdentifier=S)))
    api.schema("VpgSettingsNetworksApi", obj(failover=nullable(net), failoverTest=nullable(net)))
    api.schema("VpgSettingsBootGroupsApi", obj(bootGroups=nullable(arr(obj(
        bootGroupIdentifier=S, name=S, bootDelayInSeconds=I)))))
    script = nullable(obj(command=S, parameters=S, timeoutInSeconds=I))
    api.schema("VpgSettingsScriptsApi", obj(preRecovery=script, postRecovery=script, postBackup=script))
    ipc = obj(staticIp=S, subnetMask=S, gateway=S, primaryDns=S, secondaryDns=S, isDhcp=B)
    nicnet = nullable(obj(hypervisor=nullable(obj(
        networkIdentifier=S, shouldReplaceMacAddress=B, dnsSuffix=S, ipConfig=nullable(ipc),
        shouldReplaceIpConfiguration=B))))
    nic = obj(nicIdentifier=S, failover=nicnet, failoverTest=nicnet)
    api.schema("VpgSettingsVmNicApi", nic)
    vol = obj(volumeIdentifier=S, datastore=nullable(obj(
        datastoreClusterIdentifier=S, datastoreIdentifier=S, isThin=B)),
        preseed=nullable(obj(datastoreIdentifier=S, path=S)), volumeSyncSettings=S)
    api.schema("VpgSettingsVmVolumeApi", vol)
    vm = obj(vmIdentifier=S, bootGroupIdentifier=S, recovery=nullable(obj(
        hostIdentifier=S, hostClusterIdentifier=S, datastoreIdentifier=S,
        datastoreClusterIdentifier=S, folderIdentifier=S, resourcePoolIdentifier=S)),
        journal=nullable(store_section), scratch=nullable(store_section),
        volumes=nullable(arr(vol)), nics=nullable(arr(nic)))
    api.schema("VpgSettingsVmApi", vm)
    api.schema("VpgSettingsApi", obj(
        vpgIdentifier=S, vpgSettingsIdentifier=S,
        basic=nullable(api.schemas["VpgSettingsBasicApi"]), journal=nullable(store_section),
        scratch=nullable(store_section), recovery=nullable(api.schemas["VpgSettingsRecoveryApi"]),
        networks=nullable(api.schemas["VpgSettingsNetworksApi"]),
        bootGroups=nullable(api.schemas["VpgSettingsBootGroupsApi"]),
        scripting=nullable(api.schemas["VpgSettingsScriptsApi"]), vms=nullable(arr(vm))))


SECTION_SCHEMAS = {"basic": "VpgSettingsBasicApi", "journal": "VpgSettingsJournalApi",
                   "scratch": "VpgSettingsScratchApi", "recovery": "VpgSettingsRecoveryApi",
                   "networks": "VpgSettingsNetworksApi", "bootgroup": "VpgSettingsBootGroupsApi",
                   "scripting": "VpgSettingsScriptsApi"}


def register(api, zvm):
    _schemas(api)
    svc = zvm.services.setdefault("vpgsettings", VpgSettings(zvm))
    base = "/v1/vpgSettings/{vpgSettingsIdentifier}"
    tag = "vpgSettings"

    @api.route("POST", "/v1/vpgSettings", "Create VPG settings (new, or from an existing VPG)",
               tag=tag, body="VpgSettingsApi", body_required=False, response="string",
               query={"repopulateSettings": BOOL})
    def create(req):
        return svc.create(req.body or {}, req.user)

    @api.route("GET", "/v1/vpgSettings", "All VPG settings objects", tag=tag,
               response="[VpgSettingsApi]")
    def all_settings(req):
        return svc.list()

    @api.route("GET", base, "One VPG settings object", tag=tag, response="VpgSettingsApi")
    def one(req, vpgSettingsIdentifier):
        return svc.get(vpgSettingsIdentifier)

    @api.route("PUT", base, "Replace the sections given", tag=tag, body="VpgSettingsApi")
    def replace(req, vpgSettingsIdentifier):
        svc.replace(vpgSettingsIdentifier, req.body)

    @api.route("DELETE", base, "Discard a VPG settings object", tag=tag)
    def discard(req, vpgSettingsIdentifier):
        svc.delete(vpgSettingsIdentifier)

    @api.route("POST", base + "/commit", "Commit: create or update the VPG (a task)", tag=tag,
               response="string")
    def commit(req, vpgSettingsIdentifier):
        return zvm.services["vpgs"].commit(vpgSettingsIdentifier, req.user)

    @api.route("GET", base + "/priority", "The settings' priority", tag=tag, response="string")
    def priority(req, vpgSettingsIdentifier):
        return svc.priority(vpgSettingsIdentifier)

    for section, schema in SECTION_SCHEMAS.items():
        _section_routes(api, svc, base, section, schema, tag)

    # -- VMs, volumes, NICs
    vmp = base + "/vms/{vmIdentifier}"

    @api.route("POST", base + "/vms", "Add a VM", tag=tag, body="VpgSettingsVmApi")
    def add_vm(req, vpgSettingsIdentifier):
        svc.add_vm(vpgSettingsIdentifier, req.body)

    @api.route("GET", base + "/vms", "The VMs", tag=tag, response="[VpgSettingsVmApi]")
    def vms(req, vpgSettingsIdentifier):
        return svc.vms(vpgSettingsIdentifier)

    @api.route("GET", vmp, "One VM's settings", tag=tag, response="VpgSettingsVmApi")
    def vm(req, vpgSettingsIdentifier, vmIdentifier):
        return svc.vm(vpgSettingsIdentifier, vmIdentifier)

    @api.route("PUT", vmp, "Edit one VM's settings", tag=tag, body="VpgSettingsVmApi")
    def put_vm(req, vpgSettingsIdentifier, vmIdentifier):
        svc.put_vm(vpgSettingsIdentifier, vmIdentifier, req.body)

    @api.route("DELETE", vmp, "Remove a VM", tag=tag)
    def del_vm(req, vpgSettingsIdentifier, vmIdentifier):
        svc.remove_vm(vpgSettingsIdentifier, vmIdentifier)

    @api.route("GET", vmp + "/volumes", "A VM's volumes", tag=tag, response="[VpgSettingsVmVolumeApi]")
    def volumes(req, vpgSettingsIdentifier, vmIdentifier):
        return svc.vm(vpgSettingsIdentifier, vmIdentifier)["volumes"]

    @api.route("GET", vmp + "/volumes/{volumeIdentifier}", "One volume", tag=tag,
               response="VpgSettingsVmVolumeApi")
    def volume(req, vpgSettingsIdentifier, vmIdentifier, volumeIdentifier):
        return svc.volume(vpgSettingsIdentifier, vmIdentifier, volumeIdentifier)

    @api.route("PUT", vmp + "/volumes/{volumeIdentifier}", "Edit one volume", tag=tag,
               body="VpgSettingsVmVolumeApi")
    def put_volume(req, vpgSettingsIdentifier, vmIdentifier, volumeIdentifier):
        svc.put_volume(vpgSettingsIdentifier, vmIdentifier, volumeIdentifier, req.body)

    @api.route("GET", vmp + "/nics", "A VM's NICs", tag=tag, response="[VpgSettingsVmNicApi]")
    def nics(req, vpgSettingsIdentifier, vmIdentifier):
        return svc.vm(vpgSettingsIdentifier, vmIdentifier)["nics"]

    @api.route("GET", vmp + "/nics/{nicIdentifier}", "One NIC", tag=tag,
               response="VpgSettingsVmNicApi")
    def nic(req, vpgSettingsIdentifier, vmIdentifier, nicIdentifier):
        return svc.nic(vpgSettingsIdentifier, vmIdentifier, nicIdentifier)

    @api.route("PUT", vmp + "/nics/{nicIdentifier}", "Edit one NIC (networks, re-IP)", tag=tag,
               body="VpgSettingsVmNicApi")
    def put_nic(req, vpgSettingsIdentifier, vmIdentifier, nicIdentifier):
        svc.put_nic(vpgSettingsIdentifier, vmIdentifier, nicIdentifier, req.body)

    @api.route("DELETE", vmp + "/nics/{nicIdentifier}", "Reset one NIC's settings", tag=tag)
    def del_nic(req, vpgSettingsIdentifier, vmIdentifier, nicIdentifier):
        svc.reset_nic(vpgSettingsIdentifier, vmIdentifier, nicIdentifier)


def _section_routes(api, svc, base, section, schema, tag):
    path = f"{base}/{section}"

    @api.route("GET", path, f"The {section} section", tag=tag, response=schema)
    def get(req, vpgSettingsIdentifier):
        return svc.section(vpgSettingsIdentifier, section)

    @api.route("PUT", path, f"Edit the {section} section", tag=tag, body=schema)
    def put(req, vpgSettingsIdentifier):
        svc.put_section(vpgSettingsIdentifier, section, req.body)

    @api.route("DELETE", path, f"Reset the {section} section to its defaults", tag=tag)
    def reset(req, vpgSettingsIdentifier):
        svc.reset_section(vpgSettingsIdentifier, section)
