"""The federation file (TOML), validated by pydantic, with ``FEDRELAY_*`` overrides.

Every process of a federation reads the same kind of file; each uses its own section (a site
its ``[sites.<name>]``, the aggregator its ``[aggregator]``). Any setting can be overridden
from the environment: ``FEDRELAY_BROKER__HOST=10.0.0.5`` sets ``broker.host``, and
``FEDRELAY_SITES__SITE_1__SPOOL`` sets ``sites.site_1.spool`` (``__`` separates levels;
names are matched case-insensitively with ``_`` standing for ``-``); a list is written with
commas, ``FEDRELAY_BROKER__ADDRESSES=mq1:5671,mq2:5671``. Errors name the key and where it
came from, at start-up.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from relay.envelope import AGGREGATOR
from relay.errors import ConfigError
from relay.jobspec import NAME_PATTERN, SiteName
from relay.security import Identity, Roster, Security
from relay.topology import Topology
from relay.transport.amqp import BrokerAddress, BrokerSettings, TlsSettings
from relay.validation import describe

ENV_PREFIX = "FEDRELAY_"

RELATIVE_TO_FILE = (
    ("security", "roster"),
    ("security", "keys"),
    ("broker", "tls", "ca"),
    ("broker", "tls", "cert"),
    ("broker", "tls", "key"),
)
"""Paths read relative to the federation file, so that a provisioned kit can move as a whole."""

log = logging.getLogger(__name__)


class Section(BaseModel):
    """Base of the file's sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BrokerTls(Section):
    """TLS to the broker (paths relative to the federation file): the federation CA, this
    party's client certificate and key. With ``external_auth`` (the default) the broker logs
    the party in by its certificate's common name, and no password is needed."""

    ca: Path
    cert: Path
    key: Path
    server_hostname: str | None = None
    external_auth: bool = True


class Broker(Section):
    """Where the federation's RabbitMQ is: ``host:port``, and for a cluster its other nodes in
    ``addresses`` (``"host"`` or ``"host:port"``), tried in turn when one is unreachable."""

    host: str = "127.0.0.1"
    port: int = Field(default=5672, ge=1, le=65535)
    addresses: tuple[BrokerAddress, ...] = ()
    vhost: str = "/"
    management_url: str = "http://127.0.0.1:15672"
    heartbeat_s: int = Field(default=60, ge=1, le=3600)
    tls: BrokerTls | None = None

    @field_validator("addresses", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # An environment variable can only carry a string: "mq1:5671,mq2:5671".
        if isinstance(value, str):
            return [part for part in value.split(",") if part.strip()]
        return value


class SecuritySection(Section):
    """This party's keys and the federation's roster (paths relative to the federation file),
    as ``fedrelay provision`` writes them: envelopes are signed and verified, and payloads
    encrypted if the roster says so."""

    roster: Path
    keys: Path


class PhantomData(Section):
    """Generated brain-tumour phantom data: this site is phantom site ``index`` of ``of``."""

    kind: Literal["phantom"] = "phantom"
    seed: int = Field(default=0, ge=0)
    index: int = Field(ge=0)
    of: int = Field(ge=1, description="how many phantom sites the seed's profiles spread over")
    cases_per_site: int = Field(default=10, ge=4)
    case_split: Literal["even", "brats"] = "even"
    heterogeneity: float = Field(default=1.0, ge=0.0, le=1.0)
    volume_size: int = Field(default=32, ge=16, le=256)


class FolderData(Section):
    """This site's own cases, in the Medical Segmentation Decathlon Task01 layout (``msd``)
    or the BraTS one (``brats``); see :mod:`node.data`."""

    kind: Literal["msd", "brats"]
    path: Path
    limit: int | None = Field(default=None, ge=2, description="read only the first N cases")
    seed: int = Field(default=0, ge=0, description="the training/validation split's seed")


class Party(Section):
    """A party's broker password (none with TLS client certificates) and its durable spool."""

    password: SecretStr | None = None
    spool: Path


class Trainer(Section):
    """The site's own training code (see :mod:`node.algo`): ``factory`` names a callable
    ``make(job, options) -> SiteAlgo`` as ``package.module:name``."""

    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    options: dict[str, Any] = Field(default_factory=dict)


class Site(Party):
    """One site: credentials, spool, and its data (for fedrelay's own trainer) or its own
    trainer, which finds its data itself."""

    data: PhantomData | FolderData | None = Field(default=None, discriminator="kind")
    trainer: Trainer | None = None

    @model_validator(mode="after")
    def _data_or_trainer(self) -> Site:
        if (self.data is None) == (self.trainer is None):
            raise ValueError(
                "give the site either [data] (fedrelay's trainer on phantom, msd or brats "
                "cases) or [trainer] (its own training code), not both or neither"
            )
        return self

    @field_validator("data", mode="before")
    @classmethod
    def _phantom_by_default(cls, value: Any) -> Any:
        # ``kind`` picks the section's schema; a section without one is the phantom.
        if isinstance(value, dict) and "kind" not in value:
            return {"kind": "phantom", **value}
        return value


class Aggregator(Party):
    """The aggregator: credentials, spool, and where finished jobs' results are written."""

    output: Path


class FederationConfig(Section):
    """A whole federation file."""

    federation: str = Field(pattern=NAME_PATTERN)
    broker: Broker = Broker()
    security: SecuritySection | None = None
    aggregator: Aggregator | None = None
    sites: dict[SiteName, Site | None] = Field(min_length=1)

    @field_validator("sites", mode="before")
    @classmethod
    def _empty_is_elsewhere(cls, value: Any) -> Any:
        # ``[sites.site-2]`` with nothing under it: a site whose settings live in its own file.
        if isinstance(value, dict):
            return {name: (section or None) for name, section in value.items()}
        return value

    def topology(self) -> Topology:
        """The federation's broker topology; the ring order is the order of the sites."""
        return Topology(self.federation, tuple(self.sites))

    def broker_settings(self, user: str, password: SecretStr | None) -> BrokerSettings:
        """Connection settings for ``user``; ConfigError if it has no way to log in."""
        tls = self.broker.tls
        external = tls is not None and tls.external_auth
        if password is None and not external:
            raise ConfigError(
                f"{user}: no password; give the party's password, or [broker.tls] with a "
                "client certificate (external_auth)"
            )
        return BrokerSettings(
            host=self.broker.host,
            port=self.broker.port,
            addresses=self.broker.addresses,
            vhost=self.broker.vhost,
            username=user,
            password=password or SecretStr(""),
            heartbeat_s=self.broker.heartbeat_s,
            tls=None if tls is None else TlsSettings.model_validate(tls.model_dump()),
        )

    def party_settings(self, name: str) -> BrokerSettings:
        """Connection settings of party ``name`` (a site or the aggregator), from its section."""
        section = self.aggregator_section() if name == AGGREGATOR else self.site(name)
        return self.broker_settings(name, section.password)

    def party_security(self, name: str) -> Security | None:
        """Party ``name``'s keys and the roster; None (logged loudly) where the file has no
        [security]. ConfigError if they are missing, unsafe or do not fit this federation."""
        if self.security is None:
            log.warning(
                "%s: no [security] in the federation file: envelopes are neither signed nor "
                "verified, so anyone with broker credentials can forge them; run `fedrelay "
                "provision` and use the kit it writes",
                name,
            )
            return None
        roster = Roster.load(self.security.roster)
        if roster.federation != self.federation:
            raise ConfigError(
                f"security.roster {self.security.roster} is federation "
                f"{roster.federation!r}'s, not {self.federation!r}'s"
            )
        missing = sorted({AGGREGATOR, *self.sites} - set(roster.parties))
        if missing:
            raise ConfigError(
                f"security.roster {self.security.roster} lacks {missing}; provision them and "
                "hand every party the new roster"
            )
        return Security(Identity.load(name, self.security.keys), roster)

    def site(self, name: str) -> Site:
        """This file's section for site ``name``; ConfigError if it has none."""
        section = self.sites.get(name, ...)
        if section is ...:
            raise ConfigError(f"site {name!r} is not in the federation; sites: {list(self.sites)}")
        if section is None:
            raise ConfigError(
                f"sites.{name}: this file has no settings for {name!r}; add "
                f"[sites.{name}] with password, spool, and data or trainer"
            )
        return section

    def aggregator_section(self) -> Aggregator:
        """The aggregator's section; ConfigError if missing."""
        if self.aggregator is None:
            raise ConfigError("aggregator: missing; add [aggregator] with password, spool, output")
        return self.aggregator


def _overrides(environ: Mapping[str, str], data: dict[str, Any]) -> list[str]:
    """Apply FEDRELAY_* variables onto ``data``; return where each came from."""
    applied = []
    for variable, value in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or "__" not in variable:
            continue  # FEDRELAY_CONFIG, FEDRELAY_SITE, … are the commands' own options
        path = [part.lower() for part in variable.removeprefix(ENV_PREFIX).split("__")]
        node = data
        for part in path[:-1]:
            match = next((k for k in node if k.replace("-", "_") == part), part)
            child = node.setdefault(match, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{variable}: {'.'.join(path)} is not a section")
            node = child
        leaf = next((k for k in node if k.replace("-", "_") == path[-1]), path[-1])
        node[leaf] = value
        applied.append(variable)
    return applied


def _anchor(data: dict[str, Any], folder: Path) -> None:
    """Make the kit's relative paths relative to the federation file's folder."""
    for keys in RELATIVE_TO_FILE:
        node: Any = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = str(folder / node[keys[-1]])  # an absolute path stays as it is


def load(path: Path, environ: Mapping[str, str] | None = None) -> FederationConfig:
    """Read and validate a federation file; ConfigError names every bad key."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"federation file {path} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    applied = _overrides(os.environ if environ is None else environ, data)
    _anchor(data, path.parent)
    try:
        return FederationConfig.model_validate(data)
    except ValidationError as e:
        source = f"{path}" + (f" with {', '.join(applied)}" if applied else "")
        tags = {"data": ("phantom", "msd", "brats")}  # the data section's kinds
        raise ConfigError(f"{source}: {describe(e, what='config', tags=tags)}") from e
