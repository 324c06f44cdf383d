"""What one user's workspace is made of, validated before anything is rendered.

Two layouts: `sidecar` (the default) runs codi2 in its own container beside the user's, so the user's code
never holds the store's credentials or codi2's state; `entrypoint` is the single container whose command
is codi2, kept for local use (docs/security.md says what it exposes).

Ids become parts of Kubernetes names (`user-<id>`, `user-workspace-<id>`), so an id must already be a
DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit. Anything
else is refused with the rule it breaks; ids are never lowercased or mangled, since two users must never
map to one namespace.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from codi2 import __version__

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
NAMESPACE_PREFIX = "user-"
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
MAX_ID = 63 - len(NAMESPACE_PREFIX)
# The trail's HMAC key, bounded as the daemon's `codi2.trail.chain.load_key` bounds it (provisioning does not
# import the trail; tests/test_provisioning.py ties the two), so a key the pod's daemon would refuse is refused here.
KEY_MIN_BYTES, KEY_MAX_BYTES = 32, 4096


def read_key_file(path: Path) -> bytes:
    """A key file's bytes, read as the daemon reads it: a regular file (a FIFO must not hang the provisioner,
    /dev/zero must not fill its memory), at most one byte past the bound. Raises ValueError with one line
    that never holds the key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"not a regular file (a key is {KEY_MIN_BYTES} to {KEY_MAX_BYTES} bytes)")
        return os.read(fd, KEY_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def check_id(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    if len(value) > MAX_ID:
        raise ValueError(f"{value!r} is longer than {MAX_ID} characters (namespace user-<id> must fit 63)")
    if not DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} cannot be part of a Kubernetes name: use lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_namespace(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes namespace name (a DNS-1123 label of at most 63 characters)")
    return value


def check_quantity(value: str) -> str:
    if not QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 50Gi, 500m, 2)")
    return value


def check_labels(value: dict[str, str]) -> dict[str, str]:
    for key, item in value.items():
        if not LABEL_KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
            raise ValueError(f"label key {key!r} is not a valid Kubernetes label key")
        if not LABEL_VALUE.match(item) or len(item) > 63:
            raise ValueError(f"label value {item!r} (key {key!r}) is not a valid Kubernetes label value")
    return value


Id = Annotated[str, AfterValidator(check_id)]
Quantity = Annotated[str, AfterValidator(check_quantity)]
Namespaces = list[Annotated[str, AfterValidator(check_namespace)]]


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_request: Quantity = "250m"
    memory_request: Quantity = "512Mi"
    cpu_limit: Quantity = "2"
    memory_limit: Quantity = "4Gi"


CODI2_RESOURCES = Resources(cpu_request="100m", memory_request="128Mi", cpu_limit="1", memory_limit="512Mi")


class WorkspaceSpec(BaseModel):
    """Everything `render` needs; `session_id` is optional, like `SESSION_ID` for the daemon."""

    # Errors never echo their input: the TLS key and the integrity key are inputs.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    user_id: Id
    tenant_id: Id
    session_id: Annotated[str, AfterValidator(check_id)] | None = None
    layout: Literal["sidecar", "entrypoint"] = "sidecar"
    # Images: `<registry>/t2-workspace-pod:<tag>` and `<registry>/codi2:<tag>` (entrypoint layout:
    # `<registry>/codi2-workspace:<tag>` alone), or named in full. No registry
    # is assumed and no tag is `latest`: a pod runs exactly the release it was rendered for.
    registry: str | None = Field(default=None, min_length=1)
    image_tag: str = Field(default=__version__, min_length=1)
    image: str | None = Field(default=None, min_length=1)
    codi2_image: str | None = Field(default=None, min_length=1)
    storage_size: Quantity = "50Gi"
    state_storage_size: Quantity = "2Gi"
    storage_class: str | None = None
    resources: Resources = Resources()
    codi2_resources: Resources = CODI2_RESOURCES
    platform_namespaces: Namespaces = Field(default_factory=lambda: ["coditect-app"], min_length=1)
    monitoring_namespaces: Namespaces = Field(default_factory=lambda: ["monitoring"])
    codi2_config: str = Field(min_length=1, description="codi2.toml text for the codi2-config map")
    fdb_cluster_string: str | None = None
    # The client's TLS material (PEM), put into the codi2-fdb Secret beside the cluster file.
    fdb_tls_cert: str | None = None
    fdb_tls_key: str | None = None
    fdb_tls_ca: str | None = None
    # The trail's HMAC key file's bytes, for the codi2-integrity Secret (mounted only into codi2).
    integrity_key: bytes | None = Field(default=None, repr=False)
    labels: Annotated[dict[str, str], AfterValidator(check_labels)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _images_named(self) -> WorkspaceSpec:
        if self.registry is None and (self.image is None or (self.layout == "sidecar" and self.codi2_image is None)):
            raise ValueError(
                "no image registry: give one (e.g. gcr.io/PROJECT), or name every image in full"
                + (" (--image and --codi2-image)" if self.layout == "sidecar" else " (--image)")
            )
        return self

    @field_validator("integrity_key")
    @classmethod
    def _key_fits(cls, value: bytes | None, info: ValidationInfo) -> bytes | None:
        if value is None:
            return value
        if info.data.get("layout") == "entrypoint":
            raise ValueError(
                "the entrypoint layout has no container the user's code cannot read, so the key would protect "
                "nothing: use the sidecar layout"
            )
        if len(value) > KEY_MAX_BYTES:
            raise ValueError(f"holds more than {KEY_MAX_BYTES} bytes; a key is {KEY_MIN_BYTES} to {KEY_MAX_BYTES}")
        size = len(value.rstrip(b"\r\n"))  # the daemon's key: the file without trailing CR and LF
        if size < KEY_MIN_BYTES:
            raise ValueError(
                f"holds {size} bytes; a key needs at least {KEY_MIN_BYTES} (head -c 32 /dev/urandom > FILE)"
            )
        return value

    @property
    def workspace_image(self) -> str:
        """The user's image; in the entrypoint layout, Dockerfile.workspace's `workspace` target, whose
        entrypoint is codi2 (the user's own image runs its own command and knows nothing of codi2)."""
        name = "codi2-workspace" if self.layout == "entrypoint" else "t2-workspace-pod"
        return self.image or f"{self.registry}/{name}:{self.image_tag}"

    @property
    def sidecar_image(self) -> str:
        return self.codi2_image or f"{self.registry}/codi2:{self.image_tag}"

    @property
    def namespace(self) -> str:
        return f"{NAMESPACE_PREFIX}{self.user_id}"

    @property
    def claim_name(self) -> str:
        return f"user-workspace-{self.user_id}"

    def cluster_string(self) -> str:
        """The FDB cluster file content: given explicitly, or the codi2.toml's `cluster_string`."""
        if self.fdb_cluster_string:
            return self.fdb_cluster_string
        value = tomllib.loads(self.codi2_config).get("foundationdb", {}).get("cluster_string")
        if not value:
            raise ValueError("no FDB cluster string: give one, or set [foundationdb] cluster_string in the config")
        return str(value)

    def check_integrity(self) -> None:
        """A codi2.toml naming `[integrity] key_file` needs the key given here: without it the pod's daemon
        would refuse to start on a file that is not there."""
        named = tomllib.loads(self.codi2_config).get("integrity", {}).get("key_file")
        if named and self.integrity_key is None:
            raise ValueError(
                f"[integrity] key_file is {named!r}, but no key was given to mount there: give the key file "
                "(--integrity-key-file), or remove key_file"
            )
