"""The container image without a Docker daemon: the Dockerfile and compose file checked statically
(hadolint, shellcheck, our own rules), and the entrypoint's SSH and Jupyter parts run for real on
127.0.0.1 as user `tuner` with Debian's openssh-server and JupyterLab (set up by tools/test_services.sh)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_listening

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "docker"
DOCKERFILE = (DOCKER / "Dockerfile").read_text()
JUPYTER_ENV = Path(os.environ.get("INSTRUCTKIT_TEST_JUPYTER_ENV", "/opt/instructkit-test/jupyter"))
BIN = Path(sys.executable).parent


def instructions(name: str) -> list[str]:
    """Arguments of every Dockerfile instruction `name`, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [name]]


def test_hadolint_and_shellcheck_are_clean():
    lint = subprocess.run([str(BIN / "hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    scripts = [DOCKER / "entrypoint.sh", DOCKER / "healthcheck.sh", ROOT / "tools/test_services.sh"]
    check = subprocess.run([str(BIN / "shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_dockerfile_rules():
    assert instructions("ARG")[0] == "BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
    assert "FLASH_ATTN=false" in instructions("ARG")
    user = instructions("USER")[-1]
    assert user.split(":")[0] not in ("root", "0"), user
    assert "useradd --uid \"${TUNER_UID}\"" in DOCKERFILE and "TUNER_UID=1000" in instructions("ARG")
    assert instructions("WORKDIR") == ["/workspace"]
    assert set(instructions("EXPOSE")[0].split()) == {"8888", "2222", "8000", "6006"}
    assert instructions("HEALTHCHECK") and instructions("VOLUME")
    assert "/cache" in instructions("VOLUME")[0] and "/workspace/runs" in instructions("VOLUME")[0]
    assert "HF_HOME=/cache/huggingface" in " ".join(instructions("ENV"))
    assert instructions("ENTRYPOINT") == ['["tini", "--", "entrypoint.sh"]']
    everything = DOCKERFILE + (DOCKER / "entrypoint.sh").read_text() + (DOCKER / "compose.yaml").read_text()
    assert "--allow-root" not in everything and "allow_origin" not in everything
    # No host keys in any layer: the layer that installs openssh-server deletes the ones it generated,
    # and nothing copies or generates keys at build time.
    (install,) = [run for run in instructions("RUN") if "openssh-server" in run]
    assert "rm -f /etc/ssh/ssh_host_*" in install
    assert not any("ssh-keygen" in run for run in instructions("RUN"))
    # No secrets: no ENV/ARG gives a value to anything named like one, nothing key-like is copied.
    for line in instructions("ENV") + instructions("ARG"):
        for name, value in re.findall(r"(\w+)=(\S*)", line):
            assert not (re.search(r"TOKEN|PASSWORD|SECRET|API_KEY|PRIVATE", name) and value), line
    for copy in instructions("COPY"):
        assert not re.search(r"id_rsa|id_ed25519|\.ssh|authorized_keys|\.pem|\.env\b", copy), copy


def test_compose_publishes_on_localhost_with_gpus_and_volumes():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["instructkit"]
    assert all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert {p.split(":")[1] for p in service["ports"]} == {"8888", "2222", "8000", "6006"}
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == "all"
    assert service["ipc"] == "host" or service.get("shm_size")
    targets = {v.rsplit(":", 1)[1] for v in service["volumes"]}
    assert {"/workspace", "/workspace/data", "/workspace/runs", "/cache/huggingface"} <= targets
    assert "?" in service["environment"]["JUPYTER_TOKEN"]  # compose refuses to start without a token



@pytest.fixture(scope="module")
def services():
    """What tools/test_services.sh sets up; without it these tests fail and say how to get it."""
    problems = []
    if os.geteuid() != 0:
        problems.append("they must run as root (to run the entrypoint as user tuner)")
    if not Path("/usr/sbin/sshd").exists():
        problems.append("openssh-server is not installed")
    if subprocess.run(["id", "tuner"], capture_output=True).returncode != 0:
        problems.append("there is no user tuner")
    if not (JUPYTER_ENV / "bin/jupyter-lab").exists():
        problems.append(f"JupyterLab is not in {JUPYTER_ENV}")
    if problems:
        pytest.fail("container tests: " + "; ".join(problems) + ". Run `make test` (tools/test_services.sh) as root.",
                    pytrace=False)


class Entrypoint:
    """docker/entrypoint.sh started as user tuner in a session of its own, as the container would."""

    def __init__(self, tmp: Path, env: dict, command: list[str], user: str = "tuner"):
        tmp.mkdir(exist_ok=True)
        tmp.chmod(0o755)
        self.dir = tmp
        for name in ("ws", "sshd"):
            (tmp / name).mkdir(exist_ok=True)
            shutil.chown(tmp / name, "tuner")
        script = tmp / "entrypoint.sh"
        shutil.copy(DOCKER / "entrypoint.sh", script)
        script.chmod(0o755)
        base = {"HOME": "/home/tuner" if user == "tuner" else os.environ["HOME"],
                "PATH": f"{JUPYTER_ENV}/bin:/usr/sbin:/usr/bin:/bin", "SSH_DIR": str(tmp / "sshd"),
                "WORKSPACE": str(tmp / "ws"), "JUPYTER_IP": "127.0.0.1", "JUPYTER_LOG": str(tmp / "ws/jupyter.log"),
                "SSH_LOG": str(tmp / "ws/sshd.log"), **env}
        # setpriv execs (runuser would stay in between and swallow the signals the tests send)
        prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"] if user != "root" else []
        self.proc = subprocess.Popen([*prefix, "env", "-i", *(f"{k}={v}" for k, v in base.items()), str(script),
                                      *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_for_port(self, port: int, timeout: float = 60) -> None:
        wait_listening(port, timeout, self.proc)

    def stop(self, terminate: bool = True) -> tuple[int, str]:
        """SIGTERM the entrypoint (as `docker stop` does), or with terminate=False let it end by itself."""
        if terminate and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the session
            except ProcessLookupError:
                pass
        return self.proc.returncode, out


def ssh(key: Path, port: int, user: str = "tuner", *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
                           "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                           *options, f"{user}@127.0.0.1", "echo login-ok; id -un"],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def no_leftover_key():
    """The entrypoint writes SSH_PUBLIC_KEY to tuner's ~/.ssh/authorized_keys (where sshd looks): each
    test starts and ends without one, as a fresh container does."""
    keys = Path("/home/tuner/.ssh/authorized_keys")
    keys.unlink(missing_ok=True)
    yield
    keys.unlink(missing_ok=True)


@pytest.fixture
def box_root():
    """A directory user tuner can enter (pytest's own temporary directories are root's alone)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="instructkit-box-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def keypair(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_ssh_keys_only_for_tuner_never_root_or_passwords(services, box_root, keypair):
    port = free_port()
    env = {"SSH_PUBLIC_KEY": keypair.with_suffix(".pub").read_text().strip(), "SSH_PORT": port, "JUPYTER": "off"}
    box = Entrypoint(box_root / "box", env, ["sleep", "300"])
    try:
        box.wait_for_port(port)
        config = box_root / "box/sshd/sshd_config"
        as_tuner = ["runuser", "-u", "tuner", "--", "/usr/sbin/sshd", "-f", str(config)]  # as the container runs it
        test = subprocess.run([*as_tuner, "-t"], capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        effective = subprocess.run([*as_tuner, "-T"], capture_output=True, text=True).stdout
        for line in ("passwordauthentication no", "kbdinteractiveauthentication no", "permitrootlogin no",
                     "allowusers tuner", f"port {port}"):
            assert line in effective, line
        login = ssh(keypair, port)
        assert login.returncode == 0 and login.stdout.split() == ["login-ok", "tuner"], login.stderr
        password = ssh(keypair, port, "tuner", "-o", "PubkeyAuthentication=no",
                       "-o", "PreferredAuthentications=password,keyboard-interactive")
        assert password.returncode != 0 and "Permission denied (publickey)" in password.stderr  # nothing else offered
        root = ssh(keypair, port, "root")
        assert root.returncode != 0 and "Permission denied" in root.stderr
        fingerprint = (box_root / "box/sshd/ssh_host_ed25519_key.pub").read_text()
    finally:
        code, out = box.stop()
    assert "SSH on port" in out and code == 143, out  # sleep got the SIGTERM, the entrypoint passed on its code
    again = Entrypoint(box_root / "box", env, ["true"])  # host keys are made once, at first start
    assert again.stop(terminate=False)[0] == 0
    assert (box_root / "box/sshd/ssh_host_ed25519_key.pub").read_text() == fingerprint


def test_ssh_allow_from_limits_the_source_addresses(services, box_root, keypair):
    port = free_port()
    env = {"SSH_PUBLIC_KEY": keypair.with_suffix(".pub").read_text().strip(), "SSH_PORT": port, "JUPYTER": "off",
           "SSH_ALLOW_FROM": "10.9.9.0/24"}
    box = Entrypoint(box_root / "box", env, ["sleep", "300"])
    try:
        box.wait_for_port(port)
        assert ssh(keypair, port).returncode != 0  # 127.0.0.1 is not in 10.9.9.0/24
    finally:
        box.stop()
    bad = Entrypoint(box_root / "bad", {**env, "SSH_ALLOW_FROM": "10.0.0.1; rm -rf /"}, ["true"])
    code, out = bad.stop(terminate=False)
    assert code == 2 and "is not an address or CIDR" in out


def test_no_ssh_without_a_key(services, box_root):
    box = Entrypoint(box_root / "box", {"JUPYTER": "off"}, ["true"])
    code, out = box.stop(terminate=False)
    assert code == 0 and "SSH off" in out and not (box_root / "box/sshd/sshd_config").exists()


def get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_jupyter_answers_only_with_its_token(services, box_root):
    port = free_port()
    box = Entrypoint(box_root / "box", {"JUPYTER_PORT": port, "JUPYTER_TOKEN": "t0k3n-for-tests"}, ["sleep", "300"])
    try:
        box.wait_for_port(port)
        url = f"http://127.0.0.1:{port}/api/status"
        assert get(url) == 403
        assert get(url, {"Authorization": "token wrong"}) == 403
        assert get(url, {"Authorization": "token t0k3n-for-tests"}) == 200
        import psutil

        cmdlines = []
        for child in psutil.Process(box.proc.pid).children(recursive=True):
            try:
                cmdlines.append(" ".join(child.cmdline()))
            except psutil.Error:  # a short-lived child already gone
                pass
        jupyter = [line for line in cmdlines if "jupyter" in line]
        assert jupyter and not any("--allow-root" in line or "t0k3n" in line for line in jupyter), jupyter
    finally:
        code, out = box.stop()
    assert "t0k3n" not in out  # a given token is not echoed


def test_jupyter_without_a_token_gets_a_random_one_and_an_empty_token_is_refused(services, box_root):
    port = free_port()
    box = Entrypoint(box_root / "box", {"JUPYTER_PORT": port}, ["sleep", "300"])
    try:
        box.wait_for_port(port)
    finally:
        _, out = box.stop()
    token = re.search(r"JupyterLab token \(shown once\): ([0-9a-f]{48})", out)
    assert token, out
    empty = Entrypoint(box_root / "empty", {"JUPYTER_PORT": free_port(), "JUPYTER_TOKEN": ""}, ["sleep", "300"])
    code, out = empty.stop(terminate=False)
    assert code == 2 and "JUPYTER_TOKEN is set but empty" in out, out
    assert not (box_root / "empty/ws/jupyter.log").exists()  # nothing was started


def test_the_entrypoint_reports_the_environment_and_passes_on_signals(services, box_root):
    marker, ready = box_root / "box/ws/got-term", box_root / "box/ws/ready"
    command = ["bash", "-c", f"trap 'touch {marker}; exit 7' TERM; touch {ready}; while true; do sleep 0.1; done"]
    box = Entrypoint(box_root / "box", {"JUPYTER": "off", "PATH": f"{BIN}:/usr/sbin:/usr/bin:/bin"}, command,
                     user="root")
    deadline = time.time() + 60
    while not ready.exists():
        assert box.proc.poll() is None and time.time() < deadline, box.proc.stdout.read()
        time.sleep(0.1)
    time.sleep(0.5)  # the entrypoint sets its traps right after starting the command
    code, out = box.stop()
    assert code == 7 and marker.exists(), out
    assert "torch" in out and "instructkit" in out  # `instructkit env` ran first
