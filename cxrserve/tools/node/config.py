"""The node's one YAML file, parsed into dataclasses with clear errors (see deploy/node/node.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cxrserve.core.sites import SITE_NAME


class ConfigError(ValueError):
    pass


@dataclass
class Retry:
    """Back-off for transient failures (scorer down, PACS down, disk full).

    An instance is given up (``failed``, kept for ``cxrserve node requeue``) when it has been
    retried for ``give_up_after_s`` since it was received, or after ``attempts`` tries when
    that is set. The default rides out a whole night of scorer or PACS downtime: TorchServe
    alone takes minutes to start, and a budget of minutes failed every acked study for good.
    """
    attempts: int | None = None  # optional cap per instance and destination
    initial_s: float = 1.0       # first back-off
    max_s: float = 300.0         # back-off ceiling (doubles each try)
    give_up_after_s: float = 12 * 3600.0

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * 2 ** max(0, min(attempt - 1, 60)))

    def exhausted(self, attempts: int, since: float, now: float) -> bool:
        return (self.attempts is not None and attempts >= self.attempts) or now - since >= self.give_up_after_s


#: Destination kinds: DICOM (the result objects) and the messages of docs/HL7_FHIR.md.
DICOM_KINDS = ("cstore", "stowrs")
MESSAGE_KINDS = ("mllp", "fhir")


@dataclass
class Destination:
    """Where results go; each has its own delivery row and retry state per instance."""
    name: str
    kind: str                  # "cstore" | "stowrs" (DICOM objects) | "mllp" (HL7 ORU^R01) | "fhir" (R4 Bundle)
    host: str = "127.0.0.1"    # cstore, mllp
    port: int = 104
    ae_title: str = ""
    url: str = ""              # stowrs: DICOMweb base URL; fhir: the FHIR server's base URL
    username: str = ""
    password: str = ""
    token: str = ""            # fhir: a bearer token
    timeout_s: float = 30.0
    receiving_application: str = ""  # mllp: MSH-5
    receiving_facility: str = ""     # mllp: MSH-6
    processing_id: str = "P"         # mllp: MSH-11 (P production, T training, D debugging)
    patient_system: str = ""         # fhir: the Patient identifier's system (default urn:cxrserve:dicom-patient-id[:issuer])


@dataclass
class QueryRetrieve:
    host: str
    port: int
    ae_title: str
    timeout_s: float = 30.0


@dataclass
class ScorerConfig:
    kind: str = "rest"         # "rest" (TorchServe cxr-study) | "in_process" (a .mar) | "factory"
    url: str = "http://127.0.0.1:8080"
    model: str = ""            # default: the registry's composed model (cxr-study)
    token: str | None = None
    key_file: str | None = None
    management_url: str = "http://127.0.0.1:8081"
    timeout_s: float = 120.0
    client_retries: int = 2    # the client's own quick retries on 503/connection errors (the node backs off on top)
    archive: str = ""          # default: model_store/<the composed model>.mar

    def __post_init__(self):
        from cxrserve import families

        self.model = self.model or families.composed_model() or ""
        self.archive = self.archive or f"model_store/{self.model}.mar"
    device: str = "auto"
    factory: str = ""          # "module:function" returning an object with score(image, prior)
    options: dict = field(default_factory=lambda: {"pictures": True})


@dataclass
class Associations:
    """Who may hold the node's association slots, and for how long."""
    require_called_aet: bool = True  # refuse an A-ASSOCIATE-RQ not addressed to ae_title
    maximum: int = 8                 # concurrent associations (pynetdicom's maximum_associations)
    per_peer: int = 4                # open connections from one IP address: idle sockets of one
    #                                  host cannot fill every slot and lock out a modality
    acse_timeout_s: float = 10.0     # a connection must send its A-ASSOCIATE-RQ within this
    network_timeout_s: float = 60.0  # an association idle this long is aborted
    audit_every_s: float = 60.0      # repeated refusals of one peer/AE/reason: one audit line per period


@dataclass
class NodeConfig:
    ae_title: str = "CXRSERVE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: list[str] = field(default_factory=list)
    spool: Path = Path("/var/lib/cxrserve/spool")
    audit_log: Path | None = None
    keep_spooled_images: bool = False
    poll_s: float = 0.5
    #: C-STOREs larger than this are refused (0xA700) before anything is spooled; the
    #: scorer would refuse them anyway (its 64 MiB input limit).
    max_dataset_bytes: int = 64 * 2**20
    #: free bytes the spool's file system must keep; below it C-STORE is refused (0xA700)
    #: so the sender keeps the instance instead of the node acking what it cannot write.
    min_free_bytes: int = 2**30
    #: days a failed instance's image and results (and a kept image) stay for an operator,
    #: then they are deleted; delivered results are deleted as soon as they are delivered.
    retention_days: float = 30.0
    associations: Associations = field(default_factory=Associations)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    destinations: list[Destination] = field(default_factory=list)
    query_retrieve: QueryRetrieve | None = None
    retry: Retry = field(default_factory=Retry)
    #: calling AE title -> site (cxrserve.core.sites): its studies are answered by that site's
    #: profile; beside these, the ae_titles of the profiles installed in ``sites_dir``
    sites: dict[str, str] = field(default_factory=dict)
    #: the store's site profiles (``<store>/sites``), read for their ae_titles; "" = none
    sites_dir: Path | None = None

    @property
    def audit_path(self) -> Path:
        return self.audit_log or (self.spool / "audit.log")


def _ae(value, what: str) -> str:
    text = str(value or "").strip()
    if not 1 <= len(text) <= 16 or "\\" in text:
        raise ConfigError(f"{what}: an AE title is 1-16 characters, got {value!r}")
    return text


def load_config(path: str | Path) -> NodeConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    known = {"ae_title", "host", "port", "allowed_calling_aes", "spool", "audit_log", "keep_spooled_images",
             "poll_s", "scorer", "destinations", "query_retrieve", "retry", "max_dataset_bytes", "min_free_bytes",
             "retention_days", "associations", "sites", "sites_dir"}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    base = path.parent

    def rel(p):
        p = Path(str(p)).expanduser()
        return (p if p.is_absolute() else (base / p)).resolve()

    allowed = raw.get("allowed_calling_aes") or []
    if not isinstance(allowed, list) or not allowed:
        raise ConfigError("allowed_calling_aes: list the calling AE titles that may send (an empty list would "
                          "refuse everyone)")
    cfg = NodeConfig(
        ae_title=_ae(raw.get("ae_title", "CXRSERVE"), "ae_title"), host=str(raw.get("host", "127.0.0.1")),
        port=int(raw.get("port", 11112)), allowed_calling_aes=[_ae(a, "allowed_calling_aes") for a in allowed],
        spool=rel(raw.get("spool", "spool")), audit_log=rel(raw["audit_log"]) if raw.get("audit_log") else None,
        keep_spooled_images=bool(raw.get("keep_spooled_images", False)), poll_s=float(raw.get("poll_s", 0.5)),
        max_dataset_bytes=int(raw.get("max_dataset_bytes", 64 * 2**20)),
        min_free_bytes=int(raw.get("min_free_bytes", 2**30)),
        retention_days=float(raw.get("retention_days", 30)))
    sites = raw.get("sites") or {}
    if not isinstance(sites, dict):
        raise ConfigError("sites: a mapping of calling AE title -> site name")
    for ae, name in sites.items():
        if not SITE_NAME.match(str(name)):
            raise ConfigError(f"sites[{ae}]: site names are lower-case letters, digits, '-' or '_', got {name!r}")
        if _ae(ae, "sites") not in cfg.allowed_calling_aes:
            raise ConfigError(f"sites: {ae!r} is not in allowed_calling_aes, so it can never send")
    cfg.sites = {_ae(ae, "sites"): str(name) for ae, name in sites.items()}
    if raw.get("sites_dir"):
        cfg.sites_dir = rel(raw["sites_dir"])
    try:
        cfg.associations = Associations(**(raw.get("associations") or {}))
    except TypeError as err:
        raise ConfigError(f"associations: {err}") from err
    if cfg.associations.per_peer < 1 or cfg.associations.maximum < 1:
        raise ConfigError("associations: maximum and per_peer are at least 1")
    sc = dict(raw.get("scorer") or {})
    try:
        cfg.scorer = ScorerConfig(**sc)
    except TypeError as err:
        raise ConfigError(f"scorer: {err}") from err
    if cfg.scorer.kind not in ("rest", "in_process", "factory"):
        raise ConfigError(f"scorer.kind must be rest | in_process | factory, got {cfg.scorer.kind!r}")
    if cfg.scorer.kind == "in_process":
        cfg.scorer.archive = str(rel(cfg.scorer.archive))
    if cfg.scorer.key_file:
        cfg.scorer.key_file = str(rel(cfg.scorer.key_file))
    dests = raw.get("destinations") or []
    if not dests:
        raise ConfigError("destinations: configure at least one (kind: cstore, stowrs, mllp or fhir)")
    names = set()
    for i, d in enumerate(dests):
        try:
            dest = Destination(**{"name": d.get("name") or f"dest{i}", **{k: v for k, v in d.items() if k != "name"}})
        except TypeError as err:
            raise ConfigError(f"destinations[{i}]: {err}") from err
        if dest.kind == "cstore":
            dest.ae_title = _ae(dest.ae_title, f"destinations[{i}].ae_title")
            dest.port = int(dest.port)
        elif dest.kind in ("stowrs", "fhir"):
            if not dest.url:
                raise ConfigError(f"destinations[{i}]: {dest.kind} needs url")
        elif dest.kind == "mllp":
            dest.port = int(dest.port)
            if dest.processing_id not in ("P", "T", "D"):
                raise ConfigError(f"destinations[{i}].processing_id must be P, T or D")
        else:
            raise ConfigError(f"destinations[{i}].kind must be cstore, stowrs, mllp or fhir, got {dest.kind!r}")
        if dest.name in names:
            raise ConfigError(f"destinations: name {dest.name!r} used twice")
        names.add(dest.name)
        cfg.destinations.append(dest)
    if raw.get("query_retrieve"):
        q = raw["query_retrieve"]
        cfg.query_retrieve = QueryRetrieve(host=str(q.get("host", "127.0.0.1")), port=int(q["port"]),
                                           ae_title=_ae(q.get("ae_title"), "query_retrieve.ae_title"),
                                           timeout_s=float(q.get("timeout_s", 30)))
    if raw.get("retry"):
        try:
            cfg.retry = Retry(**raw["retry"])
        except TypeError as err:
            raise ConfigError(f"retry: {err}") from err
    return cfg
