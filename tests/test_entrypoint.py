"""The container entrypoint (entrypoint.py), run as a subprocess with a controlled environment.

Most cases use DERPBOX_ENTRYPOINT_DRY_RUN=1 (print the exec argv and the shown settings as
JSON instead of exec); the parametrized ones are run concurrently by one fixture. The last
tests let it really exec derpbox.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from derpbox import cli
from derpbox.config import BOOL, ENV_BOOL_FORMS, SETTINGS_TABLE, ConfigError, load_settings

from .support import read_until_line

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "entrypoint.py"
sys.path.insert(0, str(ROOT))
import entrypoint  # noqa: E402

BAD = "bad value!"

# One valid, non-default value per setting: (raw environment value, value shown, extra environment).
# "{tmp}" is replaced by a temporary directory. A new setting needs a line here.
SAMPLES = {
    "dev": ("yes", "true", {}),
    "addr": (":8443", ":8443", {}),
    "http_port": ("8080", "8080", {}),
    "stun_port": ("3479", "3479", {}),
    "stun": ("off", "false", {}),
    "derp": ("0", "false", {}),
    "key_path": ("{tmp}/other.key", "{tmp}/other.key", {}),
    "certmode": ("manual", "manual", {}),
    "strict_env": ("true", "true", {}),
    "certdir": ("{tmp}/certs", "{tmp}/certs", {}),
    "hostname": ("derp.example.com", "derp.example.com", {}),
    "acme_eab_kid": ("kid-123", "kid-123", {}),
    "acme_eab_key": ("c2FtcGxlLWVhYi1rZXk", entrypoint.REDACTED, {}),
    "acme_email": ("ops@example.com", "ops@example.com", {}),
    "acme_directory": ("https://acme.example.com/directory", "https://acme.example.com/directory", {}),
    "acme_ca_file": ("{tmp}/ca.pem", "{tmp}/ca.pem", {}),
    "acme_challenge": ("tls-alpn-01", "tls-alpn-01", {}),
    "acme_ip_certs": ("true", "true", {}),
    "home": ("blank", "blank", {}),
    "mesh_psk_file": ("{tmp}/mesh.key", "{tmp}/mesh.key", {}),
    "mesh_with": ("a.example.com,b.example.com", "a.example.com,b.example.com",
                  {"DERP_MESH_PSK_FILE": "{tmp}/mesh.key"}),
    "mesh_key": ("12" * 32, entrypoint.REDACTED, {}),
    "mesh_peers_file": ("{tmp}/peers", "{tmp}/peers", {"DERP_MESH_KEY": "12" * 32}),
    "mesh_ca_file": ("{tmp}/mesh-ca.pem", "{tmp}/mesh-ca.pem", {}),
    "mesh_cert_names": ("a.example.com=sha256-raw:" + "ab" * 32, "a.example.com=sha256-raw:" + "ab" * 32, {}),
    "workers": ("2", "2", {"DERP_CERT_MODE": "manual"}),
    "secrets_url": ("https://setec.example.com", "https://setec.example.com", {}),
    "secrets_path_prefix": ("dev/derp", "dev/derp", {}),
    "secrets_cache_dir": ("{tmp}/setec", "{tmp}/setec", {}),
    "bootstrap_dns_names": ("a.example.com, b.example.com", "a.example.com,b.example.com", {}),
    "unpublished_bootstrap_dns_names": ("c.example.com", "c.example.com", {}),
    "verify_clients": ("TRUE", "true", {}),
    "verify_client_urls": ("http://headscale:8080/verify,https://v.example.com/verify",
                           "http://headscale:8080/verify,https://v.example.com/verify", {}),
    "verify_client_url_fail_open": ("false", "false", {}),
    "socket": ("/var/run/tailscale/tailscaled.sock", "/var/run/tailscale/tailscaled.sock", {}),
    "verify_allowlist_file": ("{tmp}/allow.json", "{tmp}/allow.json", {}),
    "verify_cache_ttl": ("1m", "60s", {}),
    "verify_tailscale_api_tailnet": ("example.com", "example.com", {}),
    "verify_tailscale_api_token": ("tskey-api-sample", entrypoint.REDACTED, {}),
    "verify_tailscale_api_token_file": ("{tmp}/ts-api-token", "{tmp}/ts-api-token", {}),
    "verify_tailscale_api_oauth_client_id": ("k123CNTRL", "k123CNTRL",
                                             {"DERP_VERIFY_TAILSCALE_API_OAUTH_SECRET_FILE": "{tmp}/oauth-secret"}),
    "verify_tailscale_api_oauth_secret_file": ("{tmp}/oauth-secret", "{tmp}/oauth-secret",
                                               {"DERP_VERIFY_TAILSCALE_API_OAUTH_CLIENT_ID": "k123CNTRL"}),
    "verify_tailscale_api_interval": ("5m", "300s", {}),
    "verify_tailscale_api_fail_open": ("true", "true", {}),
    "verify_tailscale_api_url": ("https://api.example.com", "https://api.example.com", {}),
    "accept_connection_limit": ("12.5", "12.5", {}),
    "accept_connection_burst": ("20", "20", {}),
    "rate_config": ("{tmp}/rate.json", "{tmp}/rate.json", {}),
    "tcp_keepalive_time": ("5m", "300s", {}),
    "tcp_user_timeout": ("30s", "30s", {}),
    "tcp_write_timeout": ("500ms", "0.5s", {}),
    "ace": ("on", "true", {}),
    "config_file": ("{tmp}/derpbox.yaml", "{tmp}/derpbox.yaml", {}),
    "tls": ("on", "on", {}),
    "tls_groups": ("X25519:P-256", "X25519:P-256", {}),
    "log_level": ("debug", "debug", {}),
    "log_format": ("json", "json", {}),
    "proxy_protocol": ("v2", "v2", {}),
    "trusted_proxies": ("10.0.0.0/8,192.0.2.1", "10.0.0.0/8,192.0.2.1", {}),
    "metrics_addr": (":9090", ":9090", {}),
    "metrics_allow": ("10.1.0.0/16", "10.1.0.0/16", {}),
    "region_id": ("901", "901", {}),
    "region_code": ("fra", "fra", {}),
    "region_name": ("Frankfurt", "Frankfurt", {}),
    "public_ipv4": ("203.0.113.7", "203.0.113.7", {}),
    "public_ipv6": ("2001:db8::7", "2001:db8::7", {}),
    "public_port": ("8443", "8443", {}),
    "public_stun_port": ("3479", "3479", {}),
    "public_http_port": ("8080", "8080", {}),
    "derpmap_path": ("/derpmap.json", "/derpmap.json", {}),
}
# Aliases whose values mean something else than the setting's own form.
ALIAS_SAMPLES = {
    "DERP_PORT_HTTPS": ("8443", ":8443"),
    "DERP_PORT": ("8443", ":8443"),
    "DERP_ENABLE_HTTP": ("false", "-1"),
}

ENV_OPTIONS = [opt for opt in SETTINGS_TABLE if opt.env]
ALL_NAMES = [(opt, env) for opt in ENV_OPTIONS for env in opt.env]


def base_env(tmp: str) -> dict[str, str]:
    """A clean environment: no DERP_* from the caller, a key path that works without root."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tmp,
        "PYTHONPATH": str(ROOT),
        "LANG": "C.UTF-8",
        "DERP_CONFIG_PATH": f"{tmp}/derper.key",
        "DERP_DOMAIN": "derp-base.example.com",  # the container refuses to start without it
        entrypoint.DRY_RUN_ENV: "1",
    }


def without(env: dict[str, str], opt) -> dict[str, str]:
    names = {e.name for e in opt.env}
    return {k: v for k, v in env.items() if k not in names}


def fill(text: str, tmp: str) -> str:
    return text.replace("{tmp}", tmp)


def run(args=(), env=None, tmp="/nonexistent", timeout=30) -> subprocess.CompletedProcess:
    environ = base_env(tmp)
    environ.update(env or {})
    return subprocess.run([sys.executable, str(ENTRYPOINT), *args], env=environ, capture_output=True,
                          text=True, timeout=timeout)


def dry(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def source_line(stderr: str, flag: str) -> str:
    match = re.search(rf"^  -{re.escape(flag)} = .*$", stderr, re.M)
    assert match, stderr
    return match.group(0)


def _rejects(opt, env) -> bool:
    environ = without({"HOME": "/nonexistent", "DERP_CONFIG_PATH": "/nonexistent/k"}, opt)
    try:
        load_settings([], {**environ, env.name: BAD})
    except ConfigError as e:
        return "invalid value" in str(e)  # a parse error, not a cross-setting rule
    return False


BAD_NAMES = [(opt, env) for opt, env in ALL_NAMES if _rejects(opt, env)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("entrypoint")
    (path / "derpbox.yaml").write_text("# empty\n")
    return str(path)


def _mapping_case(opt, env, tmp):
    raw, shown, extra = SAMPLES[opt.field]
    if env.name in ALIAS_SAMPLES:
        raw, shown = ALIAS_SAMPLES[env.name]
    environ = without(base_env(tmp), opt)
    environ.update({k: fill(v, tmp) for k, v in extra.items()})
    environ[env.name] = fill(raw, tmp)
    return environ, fill(shown, tmp)


@pytest.fixture(scope="module")
def batch(tmp):
    """Every parametrized case, run concurrently once: {(kind, env name): CompletedProcess}."""
    jobs = {("default", ""): base_env(tmp)}
    for opt, env in ALL_NAMES:
        if opt.field in SAMPLES:
            jobs[("map", env.name)] = _mapping_case(opt, env, tmp)[0]
    for opt, env in BAD_NAMES:
        jobs[("bad", env.name)] = {**without(base_env(tmp), opt), env.name: BAD}

    def one(environ):
        return subprocess.run([sys.executable, str(ENTRYPOINT)], env=environ, capture_output=True, text=True,
                              timeout=120)

    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 2) * 2)) as pool:
        results = dict(zip(jobs, pool.map(one, jobs.values())))
    return results


def test_every_setting_has_a_sample():
    missing = [opt.field for opt in ENV_OPTIONS if opt.field not in SAMPLES]
    assert not missing, f"add a valid non-default sample for {missing} to SAMPLES in {__file__}"


@pytest.mark.parametrize("opt,env", ALL_NAMES, ids=[env.name for _, env in ALL_NAMES])
def test_variable_maps_to_its_setting(batch, tmp, opt, env):
    """Each primary name and each alias sets its own setting, through the entrypoint."""
    if opt.field not in SAMPLES:
        pytest.fail(f"no sample for {opt.field}")
    default = dry(batch[("default", "")])["settings"]
    proc = batch[("map", env.name)]
    shown = dry(proc)["settings"]
    expected = _mapping_case(opt, env, tmp)[1]
    assert expected != default[opt.flag], "the sample must differ from the default"
    assert shown[opt.flag] == expected
    assert source_line(proc.stderr, opt.flag).endswith(f"({env.name})")
    assert "warning" not in proc.stderr


@pytest.mark.parametrize("opt,env", BAD_NAMES, ids=[env.name for _, env in BAD_NAMES])
def test_bad_value_stops_with_name_value_and_forms(batch, opt, env):
    proc = batch[("bad", env.name)]
    assert proc.returncode == 2
    assert proc.stdout == ""  # neither exec nor the dry-run report
    forms = env.forms or (ENV_BOOL_FORMS if opt.kind is BOOL else opt.kind.forms)
    assert env.name in proc.stderr
    assert forms in proc.stderr
    if opt.secret:
        assert BAD not in proc.stderr
    else:
        assert repr(BAD) in proc.stderr


def test_bad_values_cover_every_checked_setting():
    # Only settings that take any text may accept BAD.
    accepted = {opt.field for opt in ENV_OPTIONS} - {opt.field for opt, _ in BAD_NAMES}
    for field in accepted:
        opt = next(o for o in ENV_OPTIONS if o.field == field)
        assert opt.kind.forms in ("any text", "a comma-separated list of names", "a DNS name or an IP address"), field


def test_defaults_and_argv(tmp):
    out = dry(run(tmp=tmp))
    assert out["argv"] == [sys.executable, "-m", "derpbox"]
    assert out["unset"] == []
    assert out["settings"]["c"] == f"{tmp}/derper.key"
    assert out["settings"]["certmode"] == "letsencrypt"


def test_entrypoint_args_pass_through(tmp):
    out = dry(run(["-hostname", "derp.example.com", "--stun-port=3479"], tmp=tmp))
    assert out["argv"][3:] == ["-hostname", "derp.example.com", "--stun-port=3479"]
    assert out["settings"]["hostname"] == "derp.example.com"
    assert out["settings"]["stun-port"] == "3479"


def test_precedence_args_over_extra_args_over_env(tmp):
    env = {"DERP_STUN_PORT": "1000", "DERP_HTTP_PORT": "1001", "DERP_EXTRA_ARGS": "-stun-port 2000 -http-port=2001"}
    proc = run(["-stun-port=3000"], env, tmp)
    out = dry(proc)
    # DERP_EXTRA_ARGS first, the entrypoint's own arguments last (the last occurrence of a flag wins).
    assert out["argv"][3:] == ["-stun-port", "2000", "-http-port=2001", "-stun-port=3000"]
    assert out["settings"]["stun-port"] == "3000"
    assert out["settings"]["http-port"] == "2001"
    assert source_line(proc.stderr, "stun-port").endswith("(command line)")
    assert source_line(proc.stderr, "http-port").endswith("(DERP_EXTRA_ARGS)")


def test_extra_args_alias_and_pasted_derper_command_line(tmp):
    line = "/app/derper --hostname='derp.example.com' --certmode=manual -a :8443"
    out = dry(run(env={"DERPER_EXTRA_ARGS": line}, tmp=tmp))
    assert out["argv"][3:] == ["--hostname=derp.example.com", "--certmode=manual", "-a", ":8443"]
    assert out["settings"]["certmode"] == "manual"


def test_extra_args_primary_and_alias_differ(tmp):
    proc = run(env={"DERP_EXTRA_ARGS": "-stun-port 2000", "DERPER_EXTRA_ARGS": "-stun-port 2001"}, tmp=tmp)
    assert dry(proc)["settings"]["stun-port"] == "2000"
    assert "warning: DERP_EXTRA_ARGS and DERPER_EXTRA_ARGS are both set and differ" in proc.stderr


def test_extra_args_errors_name_the_variable(tmp):
    proc = run(env={"DERP_EXTRA_ARGS": "-acme-eab-key 'unbalanced-secret"}, tmp=tmp)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "DERP_EXTRA_ARGS" in proc.stderr and "unbalanced-secret" not in proc.stderr
    proc = run(env={"DERP_EXTRA_ARGS": "-no-such-flag 1"}, tmp=tmp)
    assert proc.returncode == 2
    assert "-no-such-flag" in proc.stderr and "DERP_EXTRA_ARGS" in proc.stderr
    proc = run(env={"DERP_EXTRA_ARGS": "-stun-port=70000"}, tmp=tmp)
    assert proc.returncode == 2
    assert "'70000'" in proc.stderr and "a port number 0-65535" in proc.stderr


def test_bad_entrypoint_argument(tmp):
    proc = run(["-http-port", "eighty"], tmp=tmp)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "'eighty'" in proc.stderr and "-http-port" in proc.stderr and "a port number" in proc.stderr


def test_warning_when_primary_and_alias_differ(tmp):
    proc = run(env={"DERP_DOMAIN": "a.example.com", "DERP_HOSTNAME": "b.example.com"}, tmp=tmp)
    assert dry(proc)["settings"]["hostname"] == "a.example.com"
    warning = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1
    assert "DERP_DOMAIN" in warning[0] and "DERP_HOSTNAME" in warning[0] and "b.example.com" in warning[0]
    proc = run(env={"DERP_DOMAIN": "a.example.com", "DERP_HOSTNAME": "a.example.com"}, tmp=tmp)
    assert "warning" not in proc.stderr


def test_secrets_never_shown(tmp):
    secrets = ["c3VwZXJzZWNyZXRlbnY", "ZGlmZmVyZW50", "hunter2pw", "tok3nvalue", "alsosecret", "argsecret"]
    env = {
        "DERP_ACME_EAB_KEY": secrets[0],
        "DERP_ACME_EABKEY": secrets[1],  # differs from the primary: the warning must hide both
        "DERP_VERIFY_CLIENT_URL": f"https://user:{secrets[2]}@verify.example.com/verify?token={secrets[3]}",
        "DERP_SECRETS_URL": f"https://{secrets[4]}@setec.example.com/",
    }
    proc = run(env=env, tmp=tmp)
    out = dry(proc)
    assert out["settings"]["acme-eab-key"] == entrypoint.REDACTED
    assert "verify.example.com/verify" in out["settings"]["verify-client-url"]
    assert "DERP_ACME_EAB_KEY and DERP_ACME_EABKEY are both set and differ" in proc.stderr
    for secret in secrets[:5]:
        assert secret not in proc.stdout + proc.stderr, secret
    # The same secrets as flags, from DERP_EXTRA_ARGS and the entrypoint's arguments (the exec argv is redacted too).
    env = {"DERP_EXTRA_ARGS": f"-acme-eab-key {secrets[0]} -secrets-url=https://{secrets[4]}@setec.example.com/"}
    proc = run([f"--acme-eab-key={secrets[1]}", f"-verify-client-url=https://u:{secrets[5]}@v.example.com/verify"],
               env, tmp)
    out = dry(proc)
    assert out["settings"]["acme-eab-key"] == entrypoint.REDACTED
    assert f"--acme-eab-key={entrypoint.REDACTED}" in out["argv"]
    for secret in secrets:
        assert secret not in proc.stdout + proc.stderr, secret


def test_image_default_gives_way_to_an_alias(tmp):
    image = entrypoint.IMAGE_DEFAULTS
    env = {"DERP_CONFIG_PATH": image["DERP_CONFIG_PATH"], "DERP_KEY_FILE": f"{tmp}/k.key",
           "DERP_CERT_DIR": image["DERP_CERT_DIR"], "CERT_DIR": f"{tmp}/certs"}
    proc = run(env=env, tmp=tmp)
    out = dry(proc)
    assert out["unset"] == ["DERP_CONFIG_PATH", "DERP_CERT_DIR"]
    assert out["settings"]["c"] == f"{tmp}/k.key"
    assert out["settings"]["certdir"] == f"{tmp}/certs"
    assert "warning" not in proc.stderr
    # A value the user chose is not an image default: the primary wins, with a warning.
    proc = run(env={"DERP_CONFIG_PATH": f"{tmp}/mine.key", "DERP_KEY_FILE": f"{tmp}/k.key"}, tmp=tmp)
    assert dry(proc)["settings"]["c"] == f"{tmp}/mine.key"
    assert "DERP_CONFIG_PATH and DERP_KEY_FILE are both set and differ" in proc.stderr


def test_subcommands(tmp):
    env = {"DERP_EXTRA_ARGS": "-stun-port 2000"}
    proc = run(["healthcheck", "-a", ":8443"], env, tmp)
    # Quiet: Docker runs it every interval.
    assert proc.stderr == ""
    assert dry(proc)["argv"][3:] == ["healthcheck", "-stun-port", "2000", "-a", ":8443"]
    assert dry(run(["derpmap", "--format", "headscale"], env, tmp))["argv"][3:] == [
        "derpmap", "-stun-port", "2000", "--format", "headscale"]
    # check takes a target, not the server's flags.
    assert dry(run(["check", "derp.example.com"], env, tmp))["argv"][3:] == ["check", "derp.example.com"]
    assert dry(run(["-h"], tmp=tmp))["argv"][3:] == ["-h"]
    assert entrypoint.SUBCOMMANDS == cli.SUBCOMMANDS


def test_exec_version(tmp):
    env = base_env(tmp)
    del env[entrypoint.DRY_RUN_ENV]
    proc = subprocess.run([sys.executable, str(ENTRYPOINT), "-version"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("derpbox ")


def test_exec_replaces_the_process_and_sigterm_stops_derpbox(tmp):
    """derpbox runs as the entrypoint's own PID (PID 1 in a container) and exits cleanly on SIGTERM."""
    env = base_env(tmp)
    del env[entrypoint.DRY_RUN_ENV]
    env.update({"DERP_CERT_MODE": "manual", "DERP_DOMAIN": "127.0.0.1", "DERP_CERT_DIR": f"{tmp}/exec-certs",
                "DERP_ADDR": "127.0.0.1:0", "DERP_HTTP_PORT": "-1", "DERP_EXTRA_ARGS": "-stun-port 0"})
    proc = subprocess.Popen([sys.executable, str(ENTRYPOINT)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        read_until_line(proc.stderr, "listening on", timeout=30)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-m", b"derpbox"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_healthcheck_command_runs(tmp):
    """The image's HEALTHCHECK command works outside Docker: nothing listens here, so it fails fast."""
    env = base_env(tmp)
    del env[entrypoint.DRY_RUN_ENV]
    env.update({"DERP_CERT_MODE": "manual", "DERP_DOMAIN": "127.0.0.1", "DERP_CERT_DIR": f"{tmp}/hc-certs",
                "DERP_ADDR": "127.0.0.1:9", "DERP_HTTP_PORT": "-1", "DERP_STUN": "false"})
    proc = subprocess.run([sys.executable, str(ENTRYPOINT), "healthcheck"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout


@pytest.mark.parametrize("domain", [None, "", "derp.tailscale.com"])
def test_the_container_refuses_to_start_without_derp_domain(domain):
    env = {k: v for k, v in base_env("/nonexistent").items() if k != "DERP_DOMAIN"}
    if domain is not None:
        env["DERP_DOMAIN"] = domain
    proc = subprocess.run([sys.executable, str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("derpbox-entrypoint: DERP_DOMAIN is not set: set it in .env to this relay's "
                                  "public DNS name"), proc.stderr


def test_the_container_takes_the_hostname_from_an_alias_or_the_arguments():
    env = {k: v for k, v in base_env("/nonexistent").items() if k != "DERP_DOMAIN"}
    proc = subprocess.run([sys.executable, str(ENTRYPOINT)], env={**env, "DERP_HOSTNAME": "derp.example.net"},
                          capture_output=True, text=True, timeout=30)
    assert dry(proc)["settings"]["hostname"] == "derp.example.net"
    proc = subprocess.run([sys.executable, str(ENTRYPOINT), "-hostname", "derp.example.org"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert dry(proc)["settings"]["hostname"] == "derp.example.org"


def test_a_misspelled_variable_is_fatal_in_strict_mode_as_shipped():
    proc = run(env={"DERP_STRICT_ENV": "true", "DERP_VERIFY_CLIENT": "true"})
    assert proc.returncode == 2
    assert "DERP_VERIFY_CLIENT is not a derpbox setting and is ignored: did you mean DERP_VERIFY_CLIENTS?" in proc.stderr
    relaxed = run(env={"DERP_VERIFY_CLIENT": "true"})
    assert relaxed.returncode == 0 and "did you mean DERP_VERIFY_CLIENTS?" in relaxed.stderr
