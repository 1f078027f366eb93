"""The host's image-backed VMs (``imagedisk.py``): guest writes, disk hashes and the rebase
onto a plain file, after which the VM joins the host's IO path (mirrored from then on).

A mixin of ``Host``: it uses ``self.io``, ``self.image_vms``, ``self._lock``, ``self._vm`` and
``self.vm_status``.
"""
from __future__ import annotations

import logging

from .host_errors import BadRequest, Conflict, NotFound
from .imagedisk import DiskMoved, ImageDiskError, ImageVM
from .iopath import Disk, VMRuntime

log = logging.getLogger("tidemark.host")


class ImageVMsMixin:
    def rebase(self, vm_uuid: str, disk: int, path: str) -> dict:
        """Switch an image-backed disk to the plain file ``path`` (after the image's commit), VM running.

        Once no disk of the VM is image-backed, the VM joins the IO path: mirrored from then on.
        """
        with self._lock:
            vm = self._vm(vm_uuid)
            if not isinstance(vm, ImageVM):
                raise Conflict(f"VM {vm.name} has no image-backed disk")
            if not 0 <= disk < len(vm.disks):
                raise NotFound(f"VM {vm.name} has no disk {disk}")
            if vm.disks[disk].spec is None:
                raise Conflict(f"disk {disk} of VM {vm.name} is a plain file already")
            try:
                vm.disks[disk].rebase(path)
            except (ImageDiskError, OSError) as exc:
                raise BadRequest(f"rebase of disk {disk} of VM {vm.name}: {exc}") from exc
            log.info("VM %s disk %d rebased onto %s", vm.name, disk, path)
            if all(d.spec is None for d in vm.disks):
                self._join_io_path(vm)
            return self.vm_status(vm_uuid)

    def _join_io_path(self, vm: ImageVM) -> None:
        for d in vm.disks:
            d.lock.acquire()
        try:
            rt = VMRuntime(vm.uuid, vm.name, [Disk(d.index, d.path, d.capacity) for d in vm.disks],
                           generation=vm.generation, vm_seq=vm.vm_seq)
            self.io.add_vm(rt, "rebase")
            del self.image_vms[vm.uuid]
            for d in vm.disks:
                d.moved = True          # a guest write waiting for the lock goes through the IO path
        finally:
            for d in vm.disks:
                d.lock.release()
        vm.close()

    def disk_hash(self, vm_uuid: str, disk: int) -> dict:
        vm = self._vm(vm_uuid)
        if not 0 <= disk < len(vm.disks):
            raise NotFound(f"VM {vm.name} has no disk {disk}")
        try:
            return {"sha256": vm.disks[disk].sha256(), "capacity_bytes": vm.disks[disk].capacity}
        except ImageDiskError as exc:
            raise Conflict(str(exc)) from exc

    def _image_write(self, vm: ImageVM, disk: int, offset: int, data) -> None:
        """A guest write of an image VM; after a switch to the IO path, through the IO path."""
        try:
            vm.write(disk, offset, data)
        except DiskMoved:
            now = self.io.vms[vm.uuid]
            self.io.write(now, now.disks[disk], offset, len(data),
                          lambda view: view.__setitem__(slice(None), data))
