"""The Headscale compose variant's shipped config.yaml and derp.yaml.

No Headscale binary or image runs here, so the config is checked against the rules
Headscale 0.26 (the image compose/headscale pins) applies when `headscale serve` loads it,
written below as data. Source: juanfont/headscale hscontrol/types/config.go at 0.26
(LoadConfig defaults, validateServerConfig, LoadServerConfig, derpConfig, dnsToTailcfgDNS,
databaseConfig, isSafeServerURL), hscontrol/derp/derp.go (derp.paths read with yaml.v3
into tailcfg.DERPMap) and hscontrol/app.go (an empty initial DERP map stops the start;
POST /verify on the main router).
"""

from __future__ import annotations

import copy
import io
import ipaddress
from pathlib import Path

import pytest
import yaml

from derpbox.derpmap import NODE_KEYS, REGION_KEYS, derpmap_main

ROOT = Path(__file__).resolve().parent.parent
VARIANT = ROOT / "compose" / "headscale"
CONFIG_DIR = VARIANT / "headscale"
CONFIG = CONFIG_DIR / "config.yaml"
MOUNT = "/etc/headscale"
# The settings the shipped derp.yaml was generated with (documented in config.yaml): the
# image's ENV (Dockerfile) plus the relay's name, as `docker compose exec derpbox` sees them.
DERP_YAML_ENV = {"HOME": "/var/lib/derpbox", "DERP_CERT_DIR": "/var/lib/derpbox/certs",
                 "DERP_DOMAIN": "derp.example.com"}

# --- Headscale 0.26's rules (hscontrol/types/config.go) --------------------------------------------

# LoadConfig's viper defaults for the keys the rules below read.
DEFAULTS = {
    "dns.magic_dns": True,
    "dns.base_domain": "",
    "dns.override_local_dns": True,
    "dns.nameservers.global": [],
    "derp.server.enabled": False,
    "prefixes.allocation": "sequential",
    "tls_letsencrypt_challenge_type": "HTTP-01",
    "ephemeral_node_inactivity_timeout": "120s",
}
# validateServerConfig: set at all, these stop the start (renamed or removed keys).
FATAL_KEYS = ("acl_policy_path", "dns_config", "dns.use_username_in_magic_dns", "oidc.strip_email_domain",
              "oidc.map_legacy_users")
# Pre-0.23 spellings nothing reads any more: a config using them lacks the new key.
IGNORED_OLD_KEYS = ("ip_prefixes", "db_type", "db_path")
DATABASE_TYPES = ("sqlite", "sqlite3", "postgres")  # databaseConfig: anything else is log.Fatal
ALLOCATIONS = ("sequential", "random")  # LoadServerConfig
CHALLENGE_TYPES = ("HTTP-01", "TLS-ALPN-01")  # validateServerConfig
MIN_EPHEMERAL_TIMEOUT_S = 65  # validateServerConfig: must be more than 65s
# prefixV4/prefixV6: outside these only warns "unsupported"; we hold the shipped file to them.
TAILSCALE_V4 = ipaddress.ip_network("100.64.0.0/10")
TAILSCALE_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def get(cfg: dict, dotted: str):
    """A dotted key as viper reads it: the file's value, else LoadConfig's default, else None."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return DEFAULTS.get(dotted)
        node = node[part]
    return node


def is_set(cfg: dict, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix) and text[:-len(suffix)].replace(".", "", 1).isdigit():
            return float(text[:-len(suffix)]) * units[suffix]
    raise ValueError(f"not a Go duration: {text!r}")


def server_url_conflict(server_url: str, base_domain: str) -> str | None:
    """isSafeServerURL: base_domain may be neither server_url's host nor a parent of it.

    Headscale compares base_domain with the URL's host *including the port*, so
    ``example.com`` passes against ``http://hs.example.com:8080``; the shipped file is held
    to the stricter rule on the bare host name as well, which holds with or without a port.
    """
    authority = server_url.split("://", 1)[1].split("/", 1)[0]
    hostname = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    if hostname == base_domain:
        return "server_url cannot use the same domain as base_domain"
    base_labels = base_domain.split(".")
    for host in (authority, hostname):
        labels = host.split(".")
        if len(labels) > len(base_labels) and labels[-len(base_labels):] == base_labels:
            return "server_url cannot be part of base_domain"
    return None


def validate(cfg: dict, config_dir: Path) -> list[str]:
    """Every reason Headscale 0.26's `serve` would refuse *cfg*; paths under /etc/headscale
    are looked up in *config_dir*."""
    errors = [f"{key} is set: removed or renamed, Headscale stops" for key in FATAL_KEYS if is_set(cfg, key)]
    errors += [f"{key} is a pre-0.23 key nothing reads" for key in IGNORED_OLD_KEYS if is_set(cfg, key)]
    if is_set(cfg, "dns.extra_records") and is_set(cfg, "dns.extra_records_path"):
        errors.append("dns.extra_records and dns.extra_records_path are mutually exclusive")
    if get(cfg, "tls_letsencrypt_hostname") and (get(cfg, "tls_cert_path") or get(cfg, "tls_key_path")):
        errors.append("set either tls_letsencrypt_hostname or tls_cert_path/tls_key_path")
    if not get(cfg, "noise.private_key_path"):
        errors.append("noise.private_key_path is required")
    if get(cfg, "tls_letsencrypt_challenge_type") not in CHALLENGE_TYPES:
        errors.append("tls_letsencrypt_challenge_type must be HTTP-01 or TLS-ALPN-01")
    server_url = get(cfg, "server_url") or ""
    if not server_url.startswith(("http://", "https://")):
        errors.append("server_url must start with https:// or http://")
    if duration_seconds(str(get(cfg, "ephemeral_node_inactivity_timeout"))) <= MIN_EPHEMERAL_TIMEOUT_S:
        errors.append("ephemeral_node_inactivity_timeout must be more than 65s")
    if get(cfg, "dns.override_local_dns") and not get(cfg, "dns.nameservers.global"):
        errors.append("dns.nameservers.global must be set when dns.override_local_dns is true")

    prefixes = [(get(cfg, f"prefixes.{v}"), net) for v, net in (("v4", TAILSCALE_V4), ("v6", TAILSCALE_V6))]
    if not any(text for text, _ in prefixes):
        errors.append("no IPv4 or IPv6 prefix configured")
    for text, allowed in prefixes:
        if text and not ipaddress.ip_network(text).subnet_of(allowed):
            errors.append(f"prefix {text} is outside {allowed}")
    if get(cfg, "prefixes.allocation") not in ALLOCATIONS:
        errors.append("prefixes.allocation must be sequential or random")

    base_domain = get(cfg, "dns.base_domain")
    if base_domain and server_url.startswith(("http://", "https://")):
        conflict = server_url_conflict(server_url, base_domain)
        if conflict:
            errors.append(conflict)
    if get(cfg, "dns.magic_dns") and not base_domain:
        errors.append("dns.base_domain must be set when using MagicDNS")

    if get(cfg, "database.type") not in DATABASE_TYPES:
        errors.append("database.type must be sqlite, sqlite3 or postgres")
    elif get(cfg, "database.type") != "postgres" and not get(cfg, "database.sqlite.path"):
        errors.append("database.sqlite.path is empty")

    if get(cfg, "derp.server.enabled") and not get(cfg, "derp.server.stun_listen_addr"):
        errors.append("derp.server.stun_listen_addr must be set if derp.server.enabled is true")
    regions = 0
    for path in get(cfg, "derp.paths") or []:
        local = shipped_path(path, config_dir)
        if local is None or not local.is_file():
            errors.append(f"derp.paths: {path} is not in the shipped directory; Headscale stops")
            continue
        regions += len(yaml.safe_load(local.read_text()).get("regions") or {})
    if not regions and not get(cfg, "derp.urls") and not get(cfg, "derp.server.enabled"):
        errors.append("initial DERPMap is empty")
    return errors


def shipped_path(path: str, config_dir: Path) -> Path | None:
    """The file in *config_dir* that the container sees at *path* (None: not under the mount)."""
    if not path.startswith(MOUNT + "/"):
        return None
    return config_dir / path[len(MOUNT) + 1:]


# --- the shipped files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((VARIANT / "docker-compose.yml").read_text())


def test_config_parses_and_passes_headscale_rules(config):
    assert isinstance(config, dict)
    assert validate(config, CONFIG_DIR) == []


@pytest.mark.parametrize("key, value, expected", [
    ("server_url", "headscale.example.com:8080", "server_url must start"),
    ("dns.base_domain", "example.com", "server_url cannot be part of base_domain"),
    ("dns.base_domain", "headscale.example.com", "same domain as base_domain"),
    ("dns.base_domain", "", "dns.base_domain must be set"),
    ("dns.override_local_dns", True, "dns.nameservers.global must be set"),
    ("database.type", None, "database.type must be"),
    ("noise.private_key_path", "", "noise.private_key_path is required"),
    ("prefixes.v4", "10.0.0.0/8", "outside 100.64.0.0/10"),
    ("ephemeral_node_inactivity_timeout", "60s", "more than 65s"),
    ("derp.paths", ["/etc/headscale/missing.yaml"], "not in the shipped directory"),
    ("dns_config", {"magic_dns": True}, "dns_config is set"),
])
def test_the_rules_catch_a_broken_config(config, key, value, expected):
    broken = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = broken
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        del node[last]
    else:
        node[last] = value
    assert any(expected in error for error in validate(broken, CONFIG_DIR)), validate(broken, CONFIG_DIR)


def test_data_lives_in_the_headscale_volume(config):
    for key in ("noise.private_key_path", "database.sqlite.path"):
        assert get(config, key).startswith("/var/lib/headscale/"), key


def test_derp_map_is_derpbox_only(config):
    assert get(config, "derp.server.enabled") is False
    assert get(config, "derp.urls") == []
    assert get(config, "derp.paths") == [f"{MOUNT}/derp.yaml"]
    # Headscale re-reads the paths only when auto update is on with a non-zero frequency.
    assert get(config, "derp.auto_update_enabled") is True
    assert duration_seconds(get(config, "derp.update_frequency")) > 0


def test_compose_mounts_the_config_directory_and_publishes_the_listen_port(config, compose):
    headscale = compose["services"]["headscale"]
    assert headscale["image"] == "headscale/headscale:0.26.1"
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in headscale["volumes"]}
    assert (VARIANT / mounts[MOUNT]).resolve() == CONFIG_DIR.resolve()
    assert (CONFIG_DIR / "config.yaml").is_file()  # Headscale looks for /etc/headscale/config.yaml
    assert "/var/lib/headscale" in mounts
    host, _, port = get(config, "listen_addr").rpartition(":")
    assert host == "0.0.0.0"
    assert f"{port}:{port}/tcp" in headscale["ports"]
    # derpbox asks Headscale's POST /verify, served on the main listener.
    verify = compose["services"]["derpbox"]["environment"]["DERP_VERIFY_CLIENT_URL"]
    assert verify == f"http://headscale:{port}/verify"


def test_shipped_derp_yaml_is_what_derpbox_derpmap_prints():
    out, err = io.StringIO(), io.StringIO()
    assert derpmap_main(["--format", "headscale"], DERP_YAML_ENV, stdout=out, stderr=err) == 0, err.getvalue()
    assert (CONFIG_DIR / "derp.yaml").read_text() == out.getvalue(), (
        "regenerate: DERP_DOMAIN=derp.example.com derpbox derpmap --format headscale "
        "> compose/headscale/headscale/derp.yaml")


def test_derp_yaml_has_the_fields_headscale_reads(config):
    # yaml.v3 into tailcfg.DERPMap (no yaml tags): keys are the Go field names lower-cased;
    # an unknown key would be dropped silently, so every key must be one of them.
    derp = yaml.safe_load((CONFIG_DIR / "derp.yaml").read_text())
    assert set(derp) <= {"regions", "omitdefaultregions"}
    assert derp["regions"]
    base_domain = get(config, "dns.base_domain")
    for rid, region in derp["regions"].items():
        assert isinstance(rid, int) and region["regionid"] == rid
        assert set(region) <= {key.lower() for key in REGION_KEYS}
        assert region["regioncode"] and region["regionname"] and region["nodes"]
        for node in region["nodes"]:
            assert set(node) <= {key.lower() for key in NODE_KEYS}
            assert node["name"] and node["regionid"] == rid and node["hostname"]
            # MagicDNS takes over base_domain on the clients: the relay must stay outside it.
            assert not ("." + node["hostname"]).endswith("." + base_domain)
