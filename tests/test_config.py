"""The federation file: validation with named keys, environment overrides, start-up errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cryptography import x509

from node.config import load
from node.process import site_trainers
from node.provision import provision
from node.simulate import Federation, SimulationConfig
from node.trainer import SegmentationTrainer
from relay.errors import ConfigError

FILE = """
federation = "demo"
[broker]
host = "rabbit.example.org"
[aggregator]
password = "a"
spool = "/tmp/agg"
output = "/tmp/out"
[sites.site-1]
password = "s1"
spool = "/tmp/s1"
[sites.site-1.data]
index = 0
of = 2
[sites.site-2]
"""


def write(tmp_path: Path, text: str = FILE) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    return path


def test_a_valid_file_loads_in_ring_order_with_other_sites_left_to_their_own_files(
    tmp_path: Path,
) -> None:
    config = load(write(tmp_path), environ={})
    assert list(config.sites) == ["site-1", "site-2"]
    assert config.site("site-1").data.of == 2
    with pytest.raises(ConfigError, match=r"sites.site-2: this file has no settings"):
        config.site("site-2")
    with pytest.raises(ConfigError, match="'site-9' is not in the federation"):
        config.site("site-9")


def test_environment_overrides_settings_at_any_level(tmp_path: Path) -> None:
    environ = {
        "FEDRELAY_BROKER__HOST": "10.0.0.5",
        "FEDRELAY_SITES__SITE_1__SPOOL": "/srv/s1",
        "FEDRELAY_SITES__SITE_1__DATA__INDEX": "1",
        "HOME": "/root",
    }
    config = load(write(tmp_path), environ=environ)
    assert config.broker.host == "10.0.0.5"
    assert config.site("site-1").spool == Path("/srv/s1")
    assert config.site("site-1").data.index == 1


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        (
            FILE.replace('host = "rabbit.example.org"', "hots = 1"),
            {},
            r"config.broker.hots: Extra inputs are not permitted",
        ),
        (
            FILE.replace("index = 0", "index = -1"),
            {},
            r"config.sites.site-1.data.index: Input should be greater than or equal to 0",
        ),
        (
            FILE,
            {"FEDRELAY_BROKER__PORT": "eighty"},
            r"with FEDRELAY_BROKER__PORT: config.broker.port: .*valid integer.*'eighty'",
        ),
        (FILE.replace("[sites.site-2]", "[sites.aggregator]"), {}, "'aggregator' is reserved"),
        ("federation = ", {}, "not valid TOML"),
    ],
)
def test_bad_settings_fail_at_start_up_naming_the_key(
    tmp_path: Path, text: str, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), environ=environ)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", environ={})


def test_the_commands_own_variables_are_not_config_keys_and_secrets_are_not_echoed(
    tmp_path: Path,
) -> None:
    environ = {
        "FEDRELAY_CONFIG": "/x.toml",
        "FEDRELAY_SITE": "site-1",
        "FEDRELAY_MONITOR_PASSWORD": "monitor-SECRET",
    }
    assert load(write(tmp_path), environ=environ).federation == "demo"
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path), environ={"FEDRELAY_SITES__SITE_1__PASSWRD": "typo-SECRET"})
    assert "config.sites.site-1.passwrd: Extra inputs are not permitted" in str(error.value)
    assert "SECRET" not in str(error.value)


def test_a_phantom_site_gets_the_data_simulate_generates_with_the_same_settings(
    tmp_path: Path,
) -> None:
    data = "cases_per_site = 4\nvolume_size = 16\nheterogeneity = 0.25\nseed = 3\n"
    config = load(write(tmp_path, FILE.replace("of = 2\n", "of = 2\n" + data)))
    settings = {"sites": 2, "cases_per_site": 4, "volume_size": 16, "width": 4, "depth": 3}
    simulated = SimulationConfig.model_validate(settings | {"heterogeneity": 0.25, "seed": 3})
    job = simulated.job()
    node = site_trainers(config.sites["site-1"], "site-1")(job)
    federation = Federation.build(simulated, tmp_path / "spool")
    federation.close()
    assert federation.data["site-1"].contrast == pytest.approx(1.0, abs=0.05)  # similar scanners
    mine, theirs = node, federation.baselines["site-1"]
    assert isinstance(mine, SegmentationTrainer) and isinstance(theirs, SegmentationTrainer)
    for a, b in zip(mine.training_cases, theirs.training_cases, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)


def test_broker_addresses_come_from_a_toml_list_or_a_comma_separated_variable(
    tmp_path: Path,
) -> None:
    text = FILE.replace(
        'host = "rabbit.example.org"',
        'host = "mq1"\nport = 5671\naddresses = ["mq2", "mq3:5681", "mq1"]',
    )
    config = load(write(tmp_path, text), environ={})
    settings = config.party_settings("site-1")
    assert settings.endpoints() == [("mq1", 5671), ("mq2", 5671), ("mq3", 5681)]
    environ = {"FEDRELAY_BROKER__ADDRESSES": "10.0.0.6:5671, [fd00::7]"}
    overridden = load(write(tmp_path, text), environ=environ).party_settings("site-1")
    assert overridden.endpoints() == [("mq1", 5671), ("10.0.0.6", 5671), ("fd00::7", 5671)]


def test_a_malformed_broker_address_fails_at_start_up_naming_it(tmp_path: Path) -> None:
    text = FILE.replace(
        'host = "rabbit.example.org"', 'host = "mq1"\naddresses = ["mq2", "amqp://mq3"]'
    )
    with pytest.raises(
        ConfigError, match=r"config\.broker\.addresses\.1: 'amqp://mq3' is not a broker address"
    ):
        load(write(tmp_path, text), environ={})


def test_a_tls_kit_gives_every_broker_node_the_tls_port_and_the_certificate_names_them(
    tmp_path: Path,
) -> None:
    text = FILE.replace(
        'host = "rabbit.example.org"', 'host = "mq1"\naddresses = ["mq2", "mq3:5672", "mq4:5700"]'
    )
    kits = tmp_path / "kits"
    provision(load(write(tmp_path, text), environ={}), kits, tls=True)
    kit = load(kits / "site-1" / "federation.toml", environ={})
    assert kit.party_settings("site-1").endpoints() == [
        ("mq1", 5671),
        ("mq2", 5671),
        ("mq3", 5671),
        ("mq4", 5700),
    ]
    server = x509.load_pem_x509_certificate((kits / "operator" / "tls" / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["mq1", "mq2", "mq3", "mq4"]
