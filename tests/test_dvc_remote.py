"""`dvc push` / `dvc pull` of model folders through a local-folder remote and a real SSH remote.

A throwaway git + DVC project tracks a fake adapter and a fake merged model (safetensors + JSON), pushes
them once to each remote, and every test then deletes the workspace copies and the cache and pulls them
back. Remotes are configured the way docs/REMOTES.md tells users to: `verify = true` so that DVC re-hashes
what it downloads, and the SSH user and key only in the git-ignored `.dvc/config.local`.
DVC runs as `python -m dvc` of this interpreter, in a private HOME (no user config, no ssh agent).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dvc_project import dvc, private_env
from sshd import start_sshd

REPO = Path(__file__).resolve().parents[1]
SECRET_KEYS = ("password", "passphrase", "keyfile", "credentialpath", "secret_access_key", "sas_token",
               "account_key", "connection_string")
TRACKED = ("models/adapter", "models/merged")


def write_fake_models(root: Path) -> None:
    """A PEFT-shaped adapter and an HF-shaped merged model: small bf16 safetensors plus their JSON."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    adapter, merged = root / "models" / "adapter", root / "models" / "merged"
    adapter.mkdir(parents=True)
    merged.mkdir(parents=True)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.randn(8, 64, generator=gen).to(torch.bfloat16),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
               torch.randn(64, 8, generator=gen).to(torch.bfloat16)},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}), encoding="utf-8")
    save_file({"model.embed_tokens.weight": torch.randn(128, 64, generator=gen).to(torch.bfloat16)},
              str(merged / "model.safetensors"), metadata={"format": "pt"})
    (merged / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "torch_dtype": "bfloat16"}), encoding="utf-8")


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for folder in TRACKED for p in sorted((root / folder).rglob("*")) if p.is_file()}


def remove_workspace_and_cache(root: Path) -> None:
    for folder in TRACKED:  # the folders only: models/*.dvc and models/.gitignore are git's
        shutil.rmtree(root / folder, ignore_errors=True)
    shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)


def remote_object(remote: Path, md5: str) -> Path:
    """Where DVC 3 stores an object (files/md5/<2>/<30>) in a folder-like remote."""
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def overwrite(path: Path, data: bytes) -> None:
    path.chmod(0o644)  # DVC stores objects read-only
    path.write_bytes(data)


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory):
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A DVC project whose models are pushed to a local-folder remote, plus the models' original bytes."""
    tmp = tmp_path_factory.mktemp("dvc-remote")
    home = tmp / "home"
    home.mkdir()
    env = private_env(home)  # no ssh agent, no user config
    root = tmp / "project"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True, timeout=60)
    dvc(root, env, "init", "-q")
    dvc(root, env, "config", "core.analytics", "false")
    write_fake_models(root)
    dvc(root, env, "add", "-q", *TRACKED)

    remotes = {"local": tmp / "remote-local"}
    dvc(root, env, "remote", "add", "-d", "local", str(remotes["local"]))
    dvc(root, env, "remote", "modify", "local", "verify", "true")
    dvc(root, env, "push", "-r", "local")
    return {"root": root, "env": env, "remotes": remotes, "originals": snapshot(root)}


@pytest.fixture(scope="module")
def ssh_remote(project, sshd_server):
    """Adds the remote "ssh" (host and path shared, user and key local-only) and pushes to it."""
    root, env = project["root"], project["env"]
    path = root.parent / "remote-ssh"
    dvc(root, env, "remote", "add", "ssh", f"ssh://{sshd_server.host}:{sshd_server.port}{path.as_posix()}")
    dvc(root, env, "remote", "modify", "ssh", "verify", "true")
    dvc(root, env, "remote", "modify", "ssh", "timeout", "30")
    dvc(root, env, "remote", "modify", "--local", "ssh", "user", sshd_server.user)
    dvc(root, env, "remote", "modify", "--local", "ssh", "keyfile", str(sshd_server.client_key))
    dvc(root, env, "push", "-r", "ssh")
    project["remotes"]["ssh"] = path
    return "ssh"


@pytest.fixture(params=["local", "ssh"])
def remote(request):
    """Each test below runs once per remote; the SSH variant starts (or reuses) the test server."""
    return request.getfixturevalue("ssh_remote") if request.param == "ssh" else request.param


def test_ssh_credentials_stay_in_the_git_ignored_local_config(project, ssh_remote):
    root = project["root"]
    shared, local = (root / ".dvc" / "config").read_text(encoding="utf-8"), (root / ".dvc" / "config.local").read_text(encoding="utf-8")
    assert not any(key in shared for key in SECRET_KEYS), shared
    assert "keyfile" in local and "user" in local
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=root, env=project["env"])
    assert ignored.returncode == 0, ".dvc/config.local must be git-ignored"


def test_pull_restores_models_byte_identical(project, remote):
    root, env, originals = project["root"], project["env"], project["originals"]
    stored = [p for p in project["remotes"][remote].rglob("*") if p.is_file()]
    assert len(stored) == len(originals) + len(TRACKED)  # every file plus one .dir listing per folder

    remove_workspace_and_cache(root)
    dvc(root, env, "pull", "-r", remote)

    assert snapshot(root) == originals
    assert json.loads(dvc(root, env, "status", "--json").stdout or "{}") == {}


def test_tampered_remote_object_never_reaches_the_workspace(project, remote):
    root, env, originals = project["root"], project["env"], project["originals"]
    good = originals["models/adapter/adapter_model.safetensors"]
    md5 = hashlib.md5(good).hexdigest()
    stored = remote_object(project["remotes"][remote], md5)
    assert stored.read_bytes() == good
    evil = bytearray(good)
    evil[len(evil) // 2] ^= 0xFF  # same size, so only a content hash can tell
    overwrite(stored, bytes(evil))
    try:
        remove_workspace_and_cache(root)
        result = dvc(root, env, "pull", "-r", remote, check=False)

        assert result.returncode != 0, f"dvc pull accepted a tampered object\n{result.stdout}{result.stderr}"
        assert "models/adapter" in result.stderr
        landed = snapshot(root)
        assert all(originals[path] == data for path, data in landed.items())
        cached = remote_object(root / ".dvc" / "cache", md5)
        assert not cached.exists() or cached.read_bytes() == good
    finally:
        overwrite(stored, good)


def test_tampered_directory_listing_is_refused_or_reported(project):
    """A forged .dir listing (file names pointed at other, genuine objects).

    DVC 3.67 with verify=true notices the listing's hash mismatch but then reads the listing from the
    remote anyway and checks it out; `dvc status` then flags the folder ("not in cache" or "modified").
    Either outcome counts as caught; a silent success does not.
    """
    root, env, originals = project["root"], project["env"], project["originals"]
    dir_md5 = yaml.safe_load((root / "models" / "adapter.dvc").read_text(encoding="utf-8"))["outs"][0]["md5"]
    listing_path = remote_object(project["remotes"]["local"], dir_md5)
    listing = listing_path.read_bytes()
    entries = json.loads(listing)
    config_md5 = hashlib.md5(originals["models/adapter/adapter_config.json"]).hexdigest()
    forged = [{**entry, "md5": config_md5} for entry in entries]
    overwrite(listing_path, json.dumps(forged).encode())
    try:
        remove_workspace_and_cache(root)
        pulled = dvc(root, env, "pull", "-r", "local", check=False)
        if pulled.returncode == 0:
            status = json.loads(dvc(root, env, "status", "--json").stdout or "{}")
            assert snapshot(root) != originals  # the forgery did land: status must say so
            assert "models/adapter.dvc" in status, f"forged listing pulled silently: {status}"
            assert "models/adapter" in json.dumps(status["models/adapter.dvc"])  # "not in cache" / "modified"
    finally:
        overwrite(listing_path, listing)


def test_project_default_remote_verifies_downloads():
    """The committed .dvc/config: a default remote that re-hashes downloads, and no credentials."""
    from configobj import ConfigObj  # DVC's own config parser

    config = ConfigObj(str(REPO / ".dvc" / "config"))
    default = config["core"].get("remote")
    assert default, "no default remote in .dvc/config"
    assert config[f'remote "{default}"'].get("verify") == "true"
    shared = (REPO / ".dvc" / "config").read_text(encoding="utf-8")
    assert not any(key in shared for key in SECRET_KEYS), shared
