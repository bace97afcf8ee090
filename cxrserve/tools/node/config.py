"""The node's one YAML file, parsed into dataclasses with clear errors (see deploy/node/node.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class Retry:
    attempts: int = 8          # per instance and destination, then the instance is 'failed'
    initial_s: float = 1.0     # first back-off
    max_s: float = 60.0        # back-off ceiling (doubles each try)

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1))


@dataclass
class Destination:
    name: str
    kind: str                  # "cstore" | "stowrs"
    host: str = "127.0.0.1"
    port: int = 104
    ae_title: str = ""
    url: str = ""              # stowrs: DICOMweb base URL, e.g. http://pacs:8042/dicom-web
    username: str = ""
    password: str = ""
    timeout_s: float = 30.0


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
class NodeConfig:
    ae_title: str = "CXRSERVE"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_calling_aes: list[str] = field(default_factory=list)
    spool: Path = Path("/var/lib/cxrserve/spool")
    audit_log: Path | None = None
    keep_spooled_images: bool = False
    poll_s: float = 0.5
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    destinations: list[Destination] = field(default_factory=list)
    query_retrieve: QueryRetrieve | None = None
    retry: Retry = field(default_factory=Retry)

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
             "poll_s", "scorer", "destinations", "query_retrieve", "retry"}
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
        keep_spooled_images=bool(raw.get("keep_spooled_images", False)), poll_s=float(raw.get("poll_s", 0.5)))
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
        raise ConfigError("destinations: configure at least one (kind: cstore or stowrs)")
    names = set()
    for i, d in enumerate(dests):
        try:
            dest = Destination(**{"name": d.get("name") or f"dest{i}", **{k: v for k, v in d.items() if k != "name"}})
        except TypeError as err:
            raise ConfigError(f"destinations[{i}]: {err}") from err
        if dest.kind == "cstore":
            dest.ae_title = _ae(dest.ae_title, f"destinations[{i}].ae_title")
            dest.port = int(dest.port)
        elif dest.kind == "stowrs":
            if not dest.url:
                raise ConfigError(f"destinations[{i}]: stowrs needs url")
        else:
            raise ConfigError(f"destinations[{i}].kind must be cstore or stowrs, got {dest.kind!r}")
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
        cfg.retry = Retry(**raw["retry"])
    return cfg
