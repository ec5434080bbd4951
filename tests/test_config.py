import dataclasses
import ipaddress
import math
import sys

import pytest

from derpbox import config
from derpbox.config import (
    SETTINGS_TABLE,
    ConfigError,
    Settings,
    UsageRequested,
    load_serve_settings,
    load_settings,
    parse_go_duration,
)


@pytest.fixture(autouse=True)
def as_root(monkeypatch):
    # derper's key-path rule depends on the uid; tests choose it explicitly.
    monkeypatch.setattr(config.os, "geteuid", lambda: 0)


@pytest.fixture
def home(tmp_path):
    return tmp_path


def load(argv=(), env=None, home=None):
    environ = {"HOME": str(home or "/nonexistent-home")}
    environ.update(env or {})
    return load_settings(list(argv), environ)


def error(argv=(), env=None, home=None):
    with pytest.raises(ConfigError) as info:
        load(argv, env, home)
    return str(info.value)


def write_yaml(tmp_path, text):
    path = tmp_path / "derpbox.yaml"
    path.write_text(text)
    return str(path)


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_follow_derper(home):
    s = load(home=home)
    assert s.addr == ":443" and s.listen_host == "" and s.listen_port == 443
    assert s.hostname == "derp.tailscale.com"
    assert s.certmode == "letsencrypt"
    assert s.certdir == f"{home}/.cache/tailscale/derper-certs"
    assert s.http_port == 80 and s.stun_port == 3478
    assert s.stun is True and s.derp is True
    assert s.home == ""
    assert s.tcp_write_timeout == 2.0 and s.tcp_keepalive_time == 600.0 and s.tcp_user_timeout == 15.0
    assert s.verify_clients is False and s.verify_client_urls == () and s.verify_client_url_fail_open is True
    assert s.accept_connection_limit == math.inf and s.accept_connection_burst == sys.maxsize
    assert s.secrets_path_prefix == "prod/derp" and s.secrets_cache_dir == f"{home}/.cache/derper-secrets"
    assert s.mesh_psk_file == "" and s.mesh_with == ()
    assert s.key_path == "/var/lib/derper/derper.key"
    assert s.tls == "auto" and s.use_tls is True
    assert s.log_level == "info" and s.log_format == "text"
    assert s.dev is False and s.version_requested is False and s.config_file is None
    assert s.warnings == ()


def test_certdir_uses_xdg_cache_home():
    assert load(env={"XDG_CACHE_HOME": "/xdg"}).certdir == "/xdg/tailscale/derper-certs"


def test_mesh_psk_file_default_is_first_existing(home):
    (home / "keys").mkdir()
    (home / "keys" / "derp-mesh.key").write_text("ab" * 32)
    assert load(home=home).mesh_psk_file == f"{home}/keys/derp-mesh.key"


def test_settings_are_immutable_and_hide_the_eab_key():
    s = load(["-acme-eab-key", "c2VjcmV0"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hostname = "x"
    assert "c2VjcmV0" not in repr(s)


# --- Go flag syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["-stun-port", "5"], ["-stun-port=5"], ["--stun-port", "5"], ["--stun-port=5"]],
)
def test_go_flag_forms(argv):
    assert load(argv).stun_port == 5


@pytest.mark.parametrize("argv, expected", [(["-verify-clients"], True), (["--verify-clients"], True),
                                            (["-stun=false"], False), (["--stun=0"], False)])
def test_bool_flags_take_no_separate_value(argv, expected):
    s = load(argv)
    assert (s.verify_clients if "clients" in argv[0] else s.stun) is expected


@pytest.mark.parametrize("text", ["1", "t", "T", "TRUE", "true", "True"])
def test_go_parsebool_true_forms(text):
    assert load([f"-verify-clients={text}"]).verify_clients is True


@pytest.mark.parametrize("text", ["0", "f", "F", "FALSE", "false", "False"])
def test_go_parsebool_false_forms(text):
    assert load([f"-stun={text}"]).stun is False


@pytest.mark.parametrize("text", ["yes", "on", "tRuE", ""])
def test_go_bool_rejects_other_forms(text):
    message = error([f"-stun={text}"])
    assert f"invalid value {text!r} for flag -stun" in message
    assert "TRUE, true, True" in message


def test_bool_with_separate_value_is_an_error_like_go():
    message = error(["-stun", "false"])
    assert "unexpected argument 'false'" in message
    assert "write -stun=false" in message


def test_positional_argument_is_an_error():
    assert "unexpected argument 'serve'" in error(["serve"])
    assert "unexpected argument '-'" in error(["-"])


def test_double_dash_ends_flags():
    assert load(["-stun-port=1", "--"]).stun_port == 1
    assert "unexpected argument 'x'" in error(["--", "x"])


@pytest.mark.parametrize("arg", ["-nope", "--nope", "--nope=1"])
def test_unknown_flag(arg):
    assert f"flag provided but not defined: {arg.split('=')[0]}" in error([arg])


@pytest.mark.parametrize("arg", ["---a", "-=x", "--=x"])
def test_bad_flag_syntax(arg):
    assert f"bad flag syntax: {arg}" in error([arg])


def test_flag_needs_an_argument():
    message = error(["-a"])
    assert "flag needs an argument: -a" in message


def test_value_may_start_with_dash_like_go():
    assert load(["-secrets-path-prefix", "-x"]).secrets_path_prefix == "-x"


def test_last_repeated_flag_wins():
    assert load(["-stun-port=1", "--stun-port", "2"]).stun_port == 2


@pytest.mark.parametrize("arg", ["-h", "-help", "--help", "--h"])
def test_help_raises_usage(arg):
    with pytest.raises(UsageRequested) as info:
        load([arg])
    assert "-stun-port int" in info.value.usage
    assert "DERP_DOMAIN" in info.value.usage


def test_go_integer_syntax():
    assert load(["-http-port=0x50"]).http_port == 80
    assert load(["-stun-port=010"]).stun_port == 8  # Go reads a leading 0 as octal
    assert load(["-stun-port=1_000"]).stun_port == 1000
    assert "invalid value ' 80'" in error(["-stun-port= 80"])


# --- precedence -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, env_name, file_key, values, field",
    [
        ("stun-port", "DERP_STUN_PORT", "stun_port", ("1", "2", 3), "stun_port"),
        ("hostname", "DERP_DOMAIN", "hostname", ("cli.example", "env.example", "file.example"), "hostname"),
        ("certmode", "DERP_CERT_MODE", "certmode", ("manual", "gcp", "letsencrypt"), "certmode"),
        ("tcp-write-timeout", "DERP_TCP_WRITE_TIMEOUT", "tcp-write-timeout", ("1s", "3s", "5s"), "tcp_write_timeout"),
        ("log-level", "DERP_LOG_LEVEL", "log_level", ("debug", "warn", "error"), "log_level"),
    ],
)
def test_precedence_cli_env_file_default(tmp_path, flag, env_name, file_key, values, field):
    cli_value, env_value, file_value = values
    default = getattr(load(), field)
    path = write_yaml(tmp_path, f"{file_key}: {file_value}\n")
    parse = {"stun_port": int, "tcp_write_timeout": parse_go_duration}.get(field, str)
    # gcp needs ACME credentials; plain HTTP (port 80) keeps the TLS checks out of this test.
    base = ["-config-file", path, "-a", ":80"]

    assert getattr(load(base), field) == parse(str(file_value))
    assert getattr(load(base, {env_name: env_value}), field) == parse(env_value)
    assert getattr(load(base + [f"-{flag}={cli_value}"], {env_name: env_value}), field) == parse(cli_value)
    assert getattr(load(["-a", ":80"]), field) == default


def test_config_file_path_from_env_and_cli(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("stun-port: 1\n")
    cli_file = tmp_path / "cli.yaml"
    cli_file.write_text("stun-port: 2\n")
    assert load(env={"DERP_CONFIG_FILE": str(env_file)}).stun_port == 1
    s = load(["--config-file", str(cli_file)], {"DERP_CONFIG_FILE": str(env_file)})
    assert s.stun_port == 2 and s.config_file == str(cli_file)


# --- environment ------------------------------------------------------------------------------

ALIASES = [
    # (variable, value, field, expected): every primary and alias from ecosystem 6.1
    ("DERP_DOMAIN", "a.example", "hostname", "a.example"),
    ("DERP_HOSTNAME", "a.example", "hostname", "a.example"),
    ("DERP_HOST", "a.example", "hostname", "a.example"),
    ("TAILSCALE_DERP_HOSTNAME", "a.example", "hostname", "a.example"),
    ("DERPER_HOST", "a.example", "hostname", "a.example"),
    ("DERP_CERT_MODE", "manual", "certmode", "manual"),
    ("DERP_CERTMODE", "manual", "certmode", "manual"),
    ("TAILSCALE_DERP_CERTMODE", "manual", "certmode", "manual"),
    ("CERT_MODE", "manual", "certmode", "manual"),
    ("DERP_CERT_DIR", "/c", "certdir", "/c"),
    ("DERP_CERTDIR", "/c", "certdir", "/c"),
    ("DERP_CERTS", "/c", "certdir", "/c"),
    ("CERT_DIR", "/c", "certdir", "/c"),
    ("DERP_ADDR", ":8443", "addr", ":8443"),
    ("DERP_PORT_HTTPS", "8443", "addr", ":8443"),
    ("DERP_PORT", "8443", "addr", ":8443"),
    ("ADDR", "[::1]:8443", "addr", "[::1]:8443"),
    ("DERP_HTTP_PORT", "8080", "http_port", 8080),
    ("DERP_PORT_HTTP", "8080", "http_port", 8080),
    ("HTTP_PORT", "8080", "http_port", 8080),
    ("DERP_ENABLE_HTTP", "false", "http_port", -1),
    ("DERP_ENABLE_HTTP", "true", "http_port", 80),
    ("DERP_STUN", "off", "stun", False),
    ("DERP_RUN_STUN", "off", "stun", False),
    ("DERP_STUN_ENABLE", "off", "stun", False),
    ("DERP_ENABLE_STUN", "off", "stun", False),
    ("RUN_STUN", "off", "stun", False),
    ("DERP_STUN_PORT", "3479", "stun_port", 3479),
    ("DERP_PORT_STUN", "3479", "stun_port", 3479),
    ("STUN_PORT", "3479", "stun_port", 3479),
    ("DERP_DERP", "no", "derp", False),
    ("DERP_RUN_DERP", "no", "derp", False),
    ("RUN_DERP", "no", "derp", False),
    ("DERP_VERIFY_CLIENTS", "yes", "verify_clients", True),
    ("TAILSCALE_DERP_VERIFY_CLIENTS", "yes", "verify_clients", True),
    ("VERIFY_CLIENTS", "yes", "verify_clients", True),
    ("DERP_VERIFY_CLIENT_URL", "https://v.example/verify", "verify_client_urls", ("https://v.example/verify",)),
    ("VERIFY_CLIENT_URL", "https://v.example/verify", "verify_client_urls", ("https://v.example/verify",)),
    ("DERP_VERIFY_CLIENT_URL_FAIL_OPEN", "false", "verify_client_url_fail_open", False),
    ("VERIFY_FAIL_OPEN", "false", "verify_client_url_fail_open", False),
    ("DERP_SOCKET", "/s.sock", "socket", "/s.sock"),
    ("TS_SOCKET", "/s.sock", "socket", "/s.sock"),
    ("TAILSCALED_SOCKET_PATH", "/s.sock", "socket", "/s.sock"),
    ("SOCKET", "/s.sock", "socket", "/s.sock"),
    ("DERP_CONFIG_PATH", "/k.key", "key_path", "/k.key"),
    ("DERP_CONFIG", "/k.key", "key_path", "/k.key"),
    ("DERP_KEY_FILE", "/k.key", "key_path", "/k.key"),
    ("CONFIG_PATH", "/k.key", "key_path", "/k.key"),
    ("DERP_HOME", "blank", "home", "blank"),
    ("FLAGHOME", "blank", "home", "blank"),
    ("DERP_MESH_PSK_FILE", "/m.key", "mesh_psk_file", "/m.key"),
    ("MESH_PSKFILE", "/m.key", "mesh_psk_file", "/m.key"),
    ("DERP_BOOTSTRAP_DNS_NAMES", "a.example,b.example", "bootstrap_dns_names", ("a.example", "b.example")),
    ("BOOTSTRAP_DNS", "a.example", "bootstrap_dns_names", ("a.example",)),
    ("DERP_UNPUBLISHED_BOOTSTRAP_DNS_NAMES", "a/t", "unpublished_bootstrap_dns_names", ("a/t",)),
    ("UNPUBLISHED_DNS", "a/t", "unpublished_bootstrap_dns_names", ("a/t",)),
    ("DERP_ACME_EMAIL", "a@b.example", "acme_email", "a@b.example"),
    ("ACME_SH_EMAIL", "a@b.example", "acme_email", "a@b.example"),
    ("DERP_ACME_EAB_KID", "kid", "acme_eab_kid", "kid"),
    ("DERP_ACME_EABKID", "kid", "acme_eab_kid", "kid"),
    ("DERP_ACME_EAB_KEY", "a2V5", "acme_eab_key", "a2V5"),
    ("DERP_ACME_EABKEY", "a2V5", "acme_eab_key", "a2V5"),
    ("DERP_ACME_IP_CERTS", "on", "acme_ip_certs", True),
    ("DERP_ACCEPT_CONNECTION_LIMIT", "10.5", "accept_connection_limit", 10.5),
    ("ACCEPT_CONNECTION_LIMIT", "10", "accept_connection_limit", 10.0),
    ("DERP_ACCEPT_CONNECTION_BURST", "20", "accept_connection_burst", 20),
    ("ACCEPT_CONNECTION_BURST", "20", "accept_connection_burst", 20),
    ("DERP_TCP_KEEPALIVE_TIME", "1m", "tcp_keepalive_time", 60.0),
    ("TCP_KEEPALIVE_TIME", "1m", "tcp_keepalive_time", 60.0),
    ("DERP_TCP_USER_TIMEOUT", "5s", "tcp_user_timeout", 5.0),
    ("TCP_USER_TIMEOUT", "5s", "tcp_user_timeout", 5.0),
    ("DERP_TCP_WRITE_TIMEOUT", "0", "tcp_write_timeout", 0.0),
    ("TCP_WRITE_TIMEOUT", "0", "tcp_write_timeout", 0.0),
    ("DERP_RATE_CONFIG", "/r.json", "rate_config", "/r.json"),
    ("DERP_SECRETS_URL", "https://setec.example", "secrets_url", "https://setec.example"),
    ("DERP_SECRETS_PATH_PREFIX", "p/q", "secrets_path_prefix", "p/q"),
    ("DERP_SECRETS_CACHE_DIR", "/sc", "secrets_cache_dir", "/sc"),
    ("DERP_ACE", "1", "ace", True),
    ("DERP_DEV", "true", "dev", True),
    ("DERP_TLS", "off", "tls", "off"),
    ("DERP_VERIFY_ALLOWLIST_FILE", "/etc/nodes.json", "verify_allowlist_file", "/etc/nodes.json"),
    ("DERP_VERIFY_CACHE_TTL", "60s", "verify_cache_ttl", 60.0),
    ("DERP_VERIFY_TAILSCALE_API_TAILNET", "example.com", "verify_tailscale_api_tailnet", "example.com"),
    ("DERP_VERIFY_TAILSCALE_API_TOKEN", "tskey-api-x", "verify_tailscale_api_token", "tskey-api-x"),
    ("DERP_VERIFY_TAILSCALE_API_TOKEN_FILE", "/run/ts", "verify_tailscale_api_token_file", "/run/ts"),
    ("DERP_VERIFY_TAILSCALE_API_INTERVAL", "5m", "verify_tailscale_api_interval", 300.0),
    ("DERP_VERIFY_TAILSCALE_API_FAIL_OPEN", "yes", "verify_tailscale_api_fail_open", True),
    ("DERP_VERIFY_TAILSCALE_API_URL", "https://api.example/", "verify_tailscale_api_url", "https://api.example"),
    ("DERP_METRICS_ADDR", "127.0.0.1:9090", "metrics_addr", "127.0.0.1:9090"),
    ("DERP_METRICS_ALLOW", "10.1.0.0/16, 192.0.2.7", "metrics_allow", ("10.1.0.0/16", "192.0.2.7")),
    ("DERP_REGION_ID", "901", "region_id", 901),
    ("DERP_REGION_CODE", "fra", "region_code", "fra"),
    ("DERP_REGION_NAME", "Frankfurt", "region_name", "Frankfurt"),
    ("DERP_PUBLIC_IPV4", "203.0.113.7", "public_ipv4", "203.0.113.7"),
    ("DERP_PUBLIC_IPV6", "none", "public_ipv6", "none"),
    ("DERP_PUBLIC_PORT", "8443", "public_port", 8443),
    ("DERP_PUBLIC_STUN_PORT", "3479", "public_stun_port", 3479),
    ("DERP_PUBLIC_HTTP_PORT", "8080", "public_http_port", 8080),
    ("DERP_DERPMAP_PATH", "/derpmap.json", "derpmap_path", "/derpmap.json"),
    ("DERP_ACME_DIRECTORY", "https://127.0.0.1:14000/dir", "acme_directory", "https://127.0.0.1:14000/dir"),
    ("DERP_ACME_CA_FILE", "/etc/pebble-ca.pem", "acme_ca_file", "/etc/pebble-ca.pem"),
    ("DERP_ACME_CHALLENGE", "tls-alpn-01", "acme_challenge", "tls-alpn-01"),
    ("DERP_PROXY_PROTOCOL", "v2", "proxy_protocol", "v2"),
    ("DERP_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8", "trusted_proxies", ("127.0.0.1", "10.0.0.0/8")),
    ("DERP_TLS_GROUPS", "X25519:P-256", "tls_groups", "X25519:P-256"),
    ("DERP_LOG_LEVEL", "debug", "log_level", "debug"),
    ("DERP_LOG_FORMAT", "json", "log_format", "json"),
    ("DERP_MESH_CA_FILE", "/etc/mesh-ca.pem", "mesh_ca_file", "/etc/mesh-ca.pem"),
    ("DERP_MESH_CERT_NAMES", "203.0.113.7:443=sha256-raw:" + "ab" * 32, "mesh_cert_names",
     ("203.0.113.7:443=sha256-raw:" + "ab" * 32,)),
]


@pytest.mark.parametrize("name, value, field, expected", ALIASES)
def test_every_env_name(name, value, field, expected):
    assert getattr(load(env={name: value}), field) == expected


def test_mesh_env_names():
    env = {"DERP_MESH_WITH": "a.example, b.example/10.0.0.2", "DERP_MESH_PSK_FILE": "/m"}
    assert load(env=env).mesh_with == ("a.example", "b.example/10.0.0.2")
    assert load(env={"MESH_WITH": "a.example", "MESH_PSKFILE": "/m"}).mesh_with == ("a.example",)


def test_mesh_key_and_peers_file_env_names():
    env = {"DERP_MESH_PEERS_FILE": "/etc/derpbox/peers", "DERP_MESH_KEY": "0f" * 32}
    settings = load(env=env)
    assert (settings.mesh_peers_file, settings.mesh_key) == ("/etc/derpbox/peers", "0f" * 32)
    assert "0f0f" not in repr(settings)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-mesh-with", "a/b/c"], "too many components"),
        (["-mesh-with", "a.example:99999"], "out of range"),
        (["-mesh-with", "a.example/"], "empty dialhost"),
        (["-mesh-key", "abc"], "64 hex digits"),
        (["-mesh-cert-names", "a.example"], "is not host"),
        (["-mesh-cert-names", "a.example=sha256-raw:12"], "64 hex digits"),
        (["-mesh-peers-file", "/p"], "needs a mesh key"),
    ],
)
def test_bad_mesh_settings_are_refused_with_the_reason(flags, message):
    with pytest.raises(ConfigError, match=message):
        load(["-c", "/k", *flags])


@pytest.mark.parametrize("text, expected", [("1", 1), ("4", 4), ("auto", 0), ("AUTO", 0)])
def test_workers(text, expected):
    assert load(["-c", "/k", "-tls", "off", "-workers", text]).workers == expected


def test_workers_env_name():
    assert load(env={"DERP_WORKERS": "3", "DERP_CERT_MODE": "manual"}).workers == 3


@pytest.mark.parametrize("flags, message", [
    (["-workers", "0"], "between 1 and 1024"),
    (["-workers", "many"], "-workers"),
])
def test_bad_workers(flags, message):
    with pytest.raises(ConfigError, match=message):
        load(["-c", "/k", *flags])


def test_mesh_with_entries_are_parsed_as_derper_does():
    settings = load(["-c", "/k", "-mesh-with", "a.example, b.example:8443/10.0.0.2, [2001:db8::1]:444",
                     "-mesh-key", "ab" * 32, "-mesh-cert-names", "b.example:8443=other.example"])
    a, b, c = settings.mesh_peers
    assert (a.host, a.port, a.dial_host, a.url) == ("a.example", 443, "a.example", "https://a.example:443/derp")
    assert (b.host, b.port, b.dial_host, b.cert_name) == ("b.example", 8443, "10.0.0.2", "other.example")
    assert (c.host, c.port, c.url) == ("2001:db8::1", 444, "https://[2001:db8::1]:444/derp")


def test_table_env_names_match_the_documented_list():
    documented = {name for name, *_ in ALIASES} | {"DERP_MESH_WITH", "MESH_WITH", "DERP_CONFIG_FILE",
                                                    "DERP_MESH_KEY", "DERP_MESH_PEERS_FILE", "DERP_WORKERS",
                                                    "DERP_STRICT_ENV",
                                                    # together only: tests/test_tailscale_api.py
                                                    "DERP_VERIFY_TAILSCALE_API_OAUTH_CLIENT_ID",
                                                    "DERP_VERIFY_TAILSCALE_API_OAUTH_SECRET_FILE"}
    in_table = [env.name for opt in SETTINGS_TABLE for env in opt.env]
    assert len(in_table) == len(set(in_table))
    assert set(in_table) == documented


def test_bare_hostname_variable_is_ignored():
    assert load(env={"HOSTNAME": "container-id"}).hostname == "derp.tailscale.com"


def test_empty_variable_counts_as_unset():
    s = load(env={"DERP_DOMAIN": "", "DERP_HOSTNAME": "b.example", "DERP_STUN_PORT": "  "})
    assert s.hostname == "b.example" and s.stun_port == 3478 and s.warnings == ()


def test_primary_beats_alias_with_warning():
    s = load(env={"DERP_DOMAIN": "a.example", "DERP_HOSTNAME": "b.example"})
    assert s.hostname == "a.example"
    assert len(s.warnings) == 1
    assert "DERP_DOMAIN and DERP_HOSTNAME are both set and differ" in s.warnings[0]
    assert "using DERP_DOMAIN" in s.warnings[0]


def test_first_alias_wins_when_primary_unset():
    s = load(env={"DERP_HOST": "c.example", "DERPER_HOST": "d.example"})
    assert s.hostname == "c.example"
    assert "DERP_HOST and DERPER_HOST" in s.warnings[0]


def test_equal_values_do_not_warn():
    s = load(env={"DERP_STUN": "true", "DERP_RUN_STUN": "1", "DERP_ADDR": ":8443", "DERP_PORT": "8443"})
    assert s.warnings == ()


def test_warning_for_unparsable_ignored_alias():
    s = load(env={"DERP_STUN_PORT": "1", "STUN_PORT": "junk"})
    assert s.stun_port == 1 and "STUN_PORT" in s.warnings[0]


def test_secret_conflict_warning_hides_values():
    s = load(env={"DERP_ACME_EAB_KEY": "a2V5", "DERP_ACME_EABKEY": "b3RoZXI"})
    assert s.acme_eab_key == "a2V5"
    assert "a2V5" not in s.warnings[0] and "b3RoZXI" not in s.warnings[0]


def test_enable_http_false_beats_port_alias():
    s = load(env={"DERP_ENABLE_HTTP": "false", "DERP_PORT_HTTP": "8080"})
    assert s.http_port == -1
    assert "DERP_ENABLE_HTTP and DERP_PORT_HTTP" in s.warnings[0]


def test_env_addr_beats_bare_port():
    s = load(env={"DERP_ADDR": ":9443", "DERP_PORT": "8443"})
    assert s.addr == ":9443" and "DERP_ADDR and DERP_PORT" in s.warnings[0]


@pytest.mark.parametrize("value", ["TRUE", "Yes", "ON", "1", " true "])
def test_env_booleans_are_lenient(value):
    assert load(env={"DERP_VERIFY_CLIENTS": value}).verify_clients is True


@pytest.mark.parametrize("name", ["DERP_STUN", "DERP_ENABLE_HTTP"])
def test_env_boolean_error_names_the_variable(name):
    message = error(env={name: "maybe"})
    assert f"invalid value 'maybe' for environment variable {name}" in message
    assert "true, false, 1, 0, yes, no, on, off" in message


# --- invalid values ---------------------------------------------------------------------------

INVALID = [
    # (flag, value, text that must appear among the accepted forms / reason)
    ("a", "nonsense", ":PORT, HOST:PORT or [IPV6]:PORT"),
    ("a", "", ":PORT, HOST:PORT or [IPV6]:PORT"),
    ("a", ":", "0-65535"),
    ("a", ":99999", "0-65535"),
    ("a", ":ssh", "0-65535, 'http' or 'https'"),
    ("a", "::1:443", ":PORT, HOST:PORT or [IPV6]:PORT"),
    ("a", "[1.2.3.4]:443", "not an IPv6 address"),
    ("http-port", "-2", "-1 to disable"),
    ("http-port", "65536", "0-65535"),
    ("http-port", "eighty", "0-65535"),
    ("stun-port", "-1", "0-65535"),
    ("stun-port", "1.5", "0-65535"),
    ("certmode", "acme.sh", "manual, letsencrypt, gcp"),
    ("hostname", "", "a DNS name or an IP address"),
    ("hostname", "derp example.com", "a DNS name or an IP address"),
    ("hostname", "derp_1.example.com", "a DNS name or an IP address"),
    ("hostname", "-derp.example.com", "a DNS name or an IP address"),
    ("home", "about:blank", '"" (default page), "blank", or an http:// or https:// URL'),
    ("verify-client-url", "ftp://v.example", "http:// or https:// URL"),
    ("verify-client-url", "https://ok.example,v.example", "http:// or https:// URL"),
    ("secrets-url", "setec.example", "http:// or https:// URL"),
    ("accept-connection-limit", "-1", "zero or more"),
    ("accept-connection-limit", "nan", "zero or more"),
    ("accept-connection-limit", "lots", "zero or more"),
    ("accept-connection-burst", "-1", "zero or more"),
    ("accept-connection-burst", "1.5", "zero or more"),
    ("tcp-keepalive-time", "10", "Go duration"),
    ("tcp-user-timeout", "-1s", "not negative"),
    ("tcp-write-timeout", "-2s", "not negative"),
    ("tcp-write-timeout", "2 s", "Go duration"),
    ("tls", "yes", "auto, on, off"),
    ("log-level", "warning", "debug, info, warn, error"),
    ("log-format", "xml", "text, json"),
    ("metrics-addr", "nope", ":PORT, HOST:PORT"),
    ("metrics-allow", "10.0.0.0/33", "list of IPs or CIDRs"),
    ("region-id", "0", "900-999"),
    ("acme-directory", "ftp://x/dir", "URL"),
    ("acme-challenge", "dns-01", "auto, http-01, tls-alpn-01"),
    ("proxy-protocol", "v3", "off, v1, v2, auto"),
    ("trusted-proxies", "300.1.1.1", "list of IPs or CIDRs"),
    ("public-ipv4", "2001:db8::1", "an IPv4 address"),
    ("public-ipv6", "192.0.2.1", "an IPv6 address"),
    ("verify-client-url-fail-open", "nope", "TRUE, true, True"),
]


@pytest.mark.parametrize("flag, value, forms", INVALID)
def test_invalid_flag_value(flag, value, forms):
    message = error([f"--{flag}={value}"])
    assert f"invalid value {value!r} for flag --{flag}" in message
    assert forms in message


# Empty variables count as unset, so they cannot be invalid.
@pytest.mark.parametrize("flag, value, forms", [case for case in INVALID if case[1].strip()])
def test_invalid_env_value(flag, value, forms):
    opt = next(o for o in SETTINGS_TABLE if o.flag == flag)
    message = error(env={opt.env[0].name: value})
    assert f"invalid value {value!r} for environment variable {opt.env[0].name} (setting -{flag})" in message
    assert (config.ENV_BOOL_FORMS if opt.kind is config.BOOL else forms) in message


@pytest.mark.parametrize("source", ["flag", "env"])
def test_certmode_is_accepted_in_any_case(source):
    settings = load(["-c", "/k", "-certmode", "Manual"]) if source == "flag" else load(
        ["-c", "/k"], env={"DERP_CERT_MODE": "MANUAL"})
    assert settings.certmode == "manual"


def test_misspelled_variables_warn_with_the_closest_name():
    settings = load(["-c", "/k"], env={"DERP_DOMIAN": "derp.example.com", "DERP_VERIFY_CLIENT": "true",
                                       "DERPER_FROBNICATE": "1", "DERP_EXTRA_ARGS": "-a :443", "OTHER_THING": "x"})
    assert [w for w in settings.warnings if "not a derpbox setting" in w] == [
        "environment variable DERPER_FROBNICATE is not a derpbox setting and is ignored: no setting has a similar name",
        "environment variable DERP_DOMIAN is not a derpbox setting and is ignored: did you mean DERP_DOMAIN?",
        "environment variable DERP_VERIFY_CLIENT is not a derpbox setting and is ignored: "
        "did you mean DERP_VERIFY_CLIENTS?",
    ]
    assert settings.hostname == config.DEFAULT_HOSTNAME  # what the misspelling would silently have left


def test_misspelled_variables_are_fatal_in_strict_mode():
    with pytest.raises(ConfigError, match=r"DERP_DOMIAN is not a derpbox setting .*did you mean DERP_DOMAIN\? "
                                          r"\(strict mode: -strict-env / DERP_STRICT_ENV\)"):
        load(["-c", "/k"], env={"DERP_DOMIAN": "derp.example.com", "DERP_STRICT_ENV": "true"})
    assert load(["-c", "/k"], env={"DERP_DOMAIN": "derp.example.com", "DERP_STRICT_ENV": "true"}).hostname == \
        "derp.example.com"


@pytest.mark.parametrize("region, warned", [(1, True), (899, True), (900, False), (999, False)])
def test_a_region_id_below_900_warns(region, warned):
    settings = load(["-c", "/k", "-region-id", str(region)])
    assert any("is below 900" in w for w in settings.warnings) == warned


def test_secret_value_is_not_echoed():
    message = error(["-acme-eab-key", "not base64!"])
    assert "not base64!" not in message
    assert "-acme-eab-key" in message and "base64url or standard base64" in message


def test_eab_key_accepts_base64url_without_padding():
    assert load(["-acme-eab-key=a2V5-_8"]).acme_eab_key == "a2V5-_8"


def test_bad_bare_port_alias_names_the_variable():
    message = error(env={"DERP_PORT": "https-ish"})
    assert "DERP_PORT" in message and "a port number (becomes :PORT)" in message


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("0", 0.0), ("-0", 0.0), ("2s", 2.0), ("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5),
        ("1.5h", 5400.0), (".5s", 0.5), ("5.s", 5.0), ("1us", 1e-6), ("1µs", 1e-6), ("1μs", 1e-6),
        ("3ns", 3e-9), ("+5s", 5.0), ("-5s", -5.0), ("1h0m0s", 3600.0), ("1m30.5s", 90.5),
    ],
)
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", ".", ".s", "1x", "1 s", "--1s", "1s5", "9999999999h", " 1s"])
def test_invalid_go_durations(text):
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_negative_keepalive_is_allowed_like_go():
    assert load(["-tcp-keepalive-time=-1s"]).tcp_keepalive_time == -1.0


# --- listen address and TLS rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    "addr, host, port, tls",
    [
        (":443", "", 443, True),
        (":https", "", 443, True),
        (":http", "", 80, False),
        (":8443", "", 8443, False),
        ("1.2.3.4:443", "1.2.3.4", 443, True),
        ("[::1]:443", "::1", 443, True),
        ("localhost:0", "localhost", 0, False),
    ],
)
def test_listen_address(addr, host, port, tls):
    s = load(["-a", addr])
    assert (s.addr, s.listen_host, s.listen_port, s.use_tls) == (addr, host, port, tls)


def test_manual_certmode_serves_tls_on_any_port():
    assert load(["-a", ":8443", "-certmode", "manual"]).use_tls is True


@pytest.mark.parametrize("tls, expected", [("on", True), ("off", False)])
def test_tls_flag_forces(tls, expected):
    assert load(["-a", ":8443", "-tls", tls]).use_tls is expected
    assert load(["-a", ":443", "-tls", tls]).use_tls is expected


def test_hostname_is_ip():
    assert load(["-hostname", "192.0.2.1", "-certmode", "manual"]).hostname_is_ip is True
    assert load(["-hostname", "2001:db8::1", "-certmode", "manual"]).hostname_is_ip is True
    assert load(["-hostname", "derp.example"]).hostname_is_ip is False


# --- -dev, -version, key path --------------------------------------------------------------------


def test_dev_mode(monkeypatch):
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    s = load(["-dev", "-a", ":443", "-stun=false", "-certmode", "manual", "-c", "/k"])
    assert s.dev is True
    assert (s.addr, s.listen_host, s.listen_port) == ("127.0.0.1:3340", "127.0.0.1", 3340)
    assert s.use_tls is False and s.stun is True and s.key_path is None


def test_version_flag(monkeypatch):
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    s = load(["-version"])
    assert s.version_requested is True and s.key_path is None


def test_non_root_needs_a_key_path(monkeypatch):
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    message = error()
    assert "-c" in message and "DERP_CONFIG_PATH" in message and "root" in message
    assert load(["-c", "/tmp/k.key"]).key_path == "/tmp/k.key"
    assert load(env={"DERP_CONFIG_PATH": "/tmp/e.key"}).key_path == "/tmp/e.key"


def test_root_gets_derper_default_key_path():
    assert load().key_path == "/var/lib/derper/derper.key"
    assert load(["-c="]).key_path == "/var/lib/derper/derper.key"


# --- cross-setting rules ------------------------------------------------------------------------


def test_mesh_with_needs_a_mesh_key():
    message = error(["-mesh-with", "b.example"])
    assert "-mesh-with" in message and "-mesh-psk-file" in message and "DERP_MESH_PSK_FILE" in message
    assert load(["-mesh-with", "b.example", "-mesh-psk-file", "/m"]).mesh_with == ("b.example",)
    assert load(["-mesh-with", "b.example", "-secrets-url", "https://setec.example"]).mesh_with == ("b.example",)


def test_dev_mesh_key_comes_from_environment():
    assert "TAILSCALE_DERPER_MESH_KEY" in error(["-dev", "-mesh-with", "b.example"])
    s = load(["-dev", "-mesh-with", "b.example"], {"TAILSCALE_DERPER_MESH_KEY": "ab" * 32})
    assert s.mesh_with == ("b.example",)


def test_letsencrypt_cannot_certify_an_ip():
    message = error(["-hostname", "192.0.2.1"])
    assert "192.0.2.1" in message and "-acme-ip-certs" in message
    assert load(["-hostname", "192.0.2.1", "-acme-ip-certs"]).acme_ip_certs is True
    assert load(["-hostname", "192.0.2.1", "-a", ":8080"]).use_tls is False  # plain HTTP: no certificate


def test_acme_ip_certs_needs_letsencrypt():
    assert "-acme-ip-certs needs -certmode letsencrypt" in error(["-acme-ip-certs", "-certmode", "manual"])
    assert "-acme-ip-certs needs -certmode letsencrypt, not 'gcp'" in error(
        ["-acme-ip-certs", "-certmode", "gcp", "-hostname", "192.0.2.1"])


def test_acme_ip_certs_is_supported_for_an_ip_hostname_and_refused_with_a_dns_one():
    ip = load(["-hostname", "192.0.2.1", "-acme-ip-certs"])
    assert load_serve_settings(ip, {}).mesh_key is None
    # derper would add IP certificates per dialled address beside the DNS one; derpbox says it does not.
    message = serve_error(["-hostname", "derp.example.com", "-acme-ip-certs"])
    assert message.startswith("-acme-ip-certs with the DNS -hostname 'derp.example.com' is not supported")
    assert "set -hostname to the relay's public IP" in message and "DERP_ACME_IP_CERTS" in message
    # Without TLS there is no certificate to refuse.
    assert load_serve_settings(load(["-hostname", "derp.example.com", "-acme-ip-certs", "-a", ":8080"]), {})


def test_gcp_requirements():
    message = error(["-certmode", "gcp", "-hostname", "d.example"])
    assert "-acme-eab-kid, -acme-eab-key, -acme-email" in message
    assert "DNS -hostname" in error(["-certmode", "gcp", "-hostname", "192.0.2.1"])
    ok = ["-certmode", "gcp", "-hostname", "d.example", "-acme-eab-kid", "k", "-acme-eab-key", "a2V5",
          "-acme-email", "a@d.example"]
    assert load(ok).certmode == "gcp"


def test_empty_certdir_rejected_when_serving_tls():
    assert "-certdir" in error(["-certdir="])
    assert "-certdir" in error(env={"XDG_CACHE_HOME": "relative/dir"})
    assert load(["-certdir=", "-a", ":8080"]).certdir == ""


# --- parsed values -------------------------------------------------------------------------------


def test_send_queue_depth_from_derpers_debug_variable():
    assert load().send_queue_depth == 32
    assert load(env={"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH": "128"}).send_queue_depth == 128
    for bad in ("0", "-3", "lots", "1.5"):
        message = error(env={"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH": bad})
        assert message == (f"TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH={bad!r} is invalid: "
                           "expected a positive integer (default 32)")


def test_rtt_stats_off_by_derpers_envknob():
    assert load().rtt_stats is True
    assert load(env={"TS_DERP_DISABLE_RTT_STATS": ""}).rtt_stats is True
    assert load(env={"TS_DERP_DISABLE_RTT_STATS": "true"}).rtt_stats is False
    assert load(env={"TS_DERP_DISABLE_RTT_STATS": "0"}).rtt_stats is True
    assert error(env={"TS_DERP_DISABLE_RTT_STATS": "yes please"}) == (
        "TS_DERP_DISABLE_RTT_STATS='yes please' is invalid: expected true or false (1, t, TRUE, 0, f, FALSE, ...)")


def test_networks_are_parsed_once():
    s = load(["-metrics-addr", "127.0.0.1:9090", "-metrics-allow", "10.1.0.0/16, 192.0.2.7,::1",
              "-proxy-protocol", "v2", "-trusted-proxies", "127.0.0.1,fd00::/8"])
    assert s.metrics_listen == ("127.0.0.1", 9090)
    assert s.metrics_allow_networks == tuple(map(ipaddress.ip_network, ("10.1.0.0/16", "192.0.2.7/32", "::1/128")))
    assert s.proxy_networks == tuple(map(ipaddress.ip_network, ("127.0.0.1/32", "fd00::/8")))
    assert load().metrics_listen is None
    # -proxy-protocol off: no proxy is trusted, whatever -trusted-proxies says.
    assert load(["-trusted-proxies", "127.0.0.1"]).proxy_networks == ()


# --- the server's own checks (load_serve_settings) -------------------------------------------------


def serve_error(argv=(), env=None):
    with pytest.raises(ConfigError) as info:
        load_serve_settings(load(argv, env), env or {})
    return str(info.value)


def test_serve_refuses_what_it_cannot_do(tmp_path):
    # Meshing is supported now; what stops a mesh is a mesh key that cannot be read.
    assert serve_error(["-mesh-with", "b.example", "-mesh-psk-file", "/m"]) == (
        "mesh key file /m: No such file or directory")
    key = tmp_path / "mesh.key"
    key.write_text("12" * 32 + "\n")
    assert load_serve_settings(load(["-mesh-with", "b.example", "-mesh-psk-file", str(key)]), {}).mesh_key == (
        bytes.fromhex("12" * 32))
    assert load_serve_settings(load(["-mesh-with", "b.example", "-mesh-key", "34" * 32, "-mesh-psk-file",
                                     str(key)]), {}).mesh_key == bytes.fromhex("34" * 32)
    assert serve_error(["-secrets-url", "https://setec.example"]) == (
        "-secrets-url: fetching the mesh key from a setec server (Tailscale's internal secrets service) "
        "is not supported; use -mesh-psk-file or -mesh-key")
    assert serve_error(["-ace"]) == (
        "-ace: derper's experimental CONNECT proxy serves Tailscale's own infrastructure and is not part of "
        "derpbox; remove the flag (DERP_ACE)")
    message = serve_error(["-proxy-protocol", "auto"])
    assert message.startswith("-proxy-protocol=auto needs -trusted-proxies (DERP_TRUSTED_PROXIES)")
    assert "anyone could claim any client address" in message


def test_serve_warns_about_trusted_proxies_without_proxy_protocol():
    assert load_serve_settings(load(["-trusted-proxies", "127.0.0.1"]), {}).warnings == (
        "-trusted-proxies is set but -proxy-protocol is off: PROXY headers are not accepted",)
    assert load_serve_settings(load(), {}).warnings == ()


def test_serve_reads_the_mesh_key(tmp_path):
    key = bytes(range(32))
    (tmp_path / "mesh.key").write_text(key.hex() + "\n")
    assert load_serve_settings(load(["-mesh-psk-file", str(tmp_path / "mesh.key")]), {}).mesh_key == key
    assert load_serve_settings(load(), {}).mesh_key is None
    (tmp_path / "short.key").write_text("abc")
    message = serve_error(["-mesh-psk-file", str(tmp_path / "short.key")])
    assert message == (f"mesh key file {tmp_path / 'short.key'}: "
                       "mesh key must be exactly 64 hex digits, found 3 characters")
    assert "No such file" in serve_error(["-mesh-psk-file", str(tmp_path / "missing.key")])


def test_serve_reads_the_dev_mesh_key_from_the_environment():
    env = {"TAILSCALE_DERPER_MESH_KEY": "ab" * 32}
    assert load_serve_settings(load(["-dev"], env), env).mesh_key == b"\xab" * 32
    assert load_serve_settings(load(["-dev"]), {}).mesh_key is None
    env = {"TAILSCALE_DERPER_MESH_KEY": "xyz"}
    assert serve_error(["-dev"], env).startswith("TAILSCALE_DERPER_MESH_KEY: mesh key must be exactly 64 hex digits")


# --- YAML config file ---------------------------------------------------------------------------


def test_yaml_file_keys_with_dashes_or_underscores(tmp_path):
    path = write_yaml(tmp_path, """
hostname: derp.example
stun_port: 3479
http-port: -1
stun: false
tcp-write-timeout: 0
accept-connection-limit: .inf
mesh-with: [a.example, b.example]
mesh-psk-file: /m
verify-client-url: https://v.example/verify
c: /k.key
a: "[::]:443"
home:
""")
    s = load(["-config-file", path])
    assert s.hostname == "derp.example" and s.stun_port == 3479 and s.http_port == -1 and s.stun is False
    assert s.tcp_write_timeout == 0.0 and s.accept_connection_limit == math.inf
    assert s.mesh_with == ("a.example", "b.example") and s.verify_client_urls == ("https://v.example/verify",)
    assert s.key_path == "/k.key" and s.listen_host == "::" and s.home == ""


def test_yaml_unknown_key(tmp_path):
    path = write_yaml(tmp_path, "stun_prot: 1\n")
    message = error(["-config-file", path])
    assert path in message and "unknown setting 'stun_prot'" in message and "did you mean 'stun-port'" in message


@pytest.mark.parametrize("key", ["config-file", "version", "listen_host"])
def test_yaml_rejects_keys_that_are_not_file_settings(tmp_path, key):
    assert f"unknown setting {key!r}" in error(["-config-file", write_yaml(tmp_path, f"{key}: x\n")])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("stun: 'true'\n", "expected true/false"),
        ("stun-port: true\n", "got bool"),
        ("hostname: [a, b]\n", "got list"),
        ("acme-eab-kid: 12345\n", "expected text"),
        ("mesh-with: [1, 2]\n", "list items must be text"),
        ("stun: {a: 1}\n", "got dict"),
    ],
)
def test_yaml_wrong_type(tmp_path, text, expected):
    path = write_yaml(tmp_path, text)
    message = error(["-config-file", path])
    assert "wrong type" in message and path in message and expected in message


def test_yaml_invalid_value_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "stun_port: 70000\n")
    message = error(["-config-file", path])
    assert f"invalid value '70000' for 'stun_port' in config file {path}" in message and "0-65535" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_yaml_top_level_must_be_mapping(tmp_path, text):
    assert "top level must be a mapping" in error(["-config-file", write_yaml(tmp_path, text)])


def test_yaml_empty_file_is_fine(tmp_path):
    assert load(["-config-file", write_yaml(tmp_path, "# nothing\n")]).stun_port == 3478


def test_yaml_duplicate_spellings(tmp_path):
    path = write_yaml(tmp_path, "stun-port: 1\nstun_port: 2\n")
    assert "'stun_port' sets -stun-port a second time" in error(["-config-file", path])


def test_yaml_syntax_error(tmp_path):
    assert "not valid YAML" in error(["-config-file", write_yaml(tmp_path, "a: [unclosed\n")])


def test_yaml_missing_file(tmp_path):
    message = error(["-config-file", str(tmp_path / "missing.yaml")])
    assert "cannot read config file" in message and "missing.yaml" in message


# --- the table ------------------------------------------------------------------------------------

DERPER_FLAGS = {
    "dev", "version", "a", "http-port", "stun-port", "stun", "derp", "c", "certmode", "certdir", "hostname",
    "acme-eab-kid", "acme-eab-key", "acme-email", "acme-ip-certs", "home", "mesh-psk-file", "mesh-with",
    "secrets-url", "secrets-path-prefix", "secrets-cache-dir", "bootstrap-dns-names",
    "unpublished-bootstrap-dns-names", "verify-clients", "verify-client-url", "verify-client-url-fail-open",
    "socket", "accept-connection-limit", "accept-connection-burst", "rate-config", "tcp-keepalive-time",
    "tcp-user-timeout", "tcp-write-timeout", "ace",
}


# derpbox-only (derper has no Tailscale API check): tests/test_tailscale_api.py covers them.
TAILSCALE_API_FLAGS = {"verify-tailscale-api-" + name for name in (
    "tailnet", "token", "token-file", "oauth-client-id", "oauth-secret-file", "interval", "fail-open", "url")}


def test_table_covers_every_derper_flag_and_every_setting():
    flags = [opt.flag for opt in SETTINGS_TABLE]
    assert len(flags) == len(set(flags))
    assert set(flags) == DERPER_FLAGS | {"config-file", "tls", "log-level", "log-format", "tls-groups", "verify-allowlist-file", "verify-cache-ttl",
                                    "metrics-addr", "metrics-allow", "region-id", "region-code", "region-name",
                                    "public-ipv4", "public-ipv6", "public-port", "public-stun-port",
                                    "public-http-port", "derpmap-path", "acme-directory", "acme-ca-file",
                                    "acme-challenge", "proxy-protocol", "trusted-proxies", "mesh-key",
                                    "mesh-peers-file", "mesh-ca-file", "mesh-cert-names", "workers", "strict-env"} | TAILSCALE_API_FLAGS
    derived = {"listen_host", "listen_port", "warnings", "send_queue_depth", "rtt_stats", "metrics_listen", "metrics_allow_networks",
               "proxy_networks", "mesh_peers"}
    assert {opt.field for opt in SETTINGS_TABLE} | derived == {f.name for f in dataclasses.fields(Settings)}
