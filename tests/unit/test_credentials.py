"""Credentials from `--auth-file` and from mounted Secret directories.

The Secret directories are plain directories laid out as the kubelet mounts a Secret (one file
per key); a real mount adds `..data` symlinks, which reading by key name does not notice.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from imagestream.errors import UsageError
from imagestream.pipeline.credentials import (
    Credentials,
    RegistryLogin,
    basic_header,
    load_auth_file,
    load_secret_dir,
    normalise_registry,
)

PASSWORD = "s3cret-Pa55"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def auth_file(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "auth"
    path.write_text(content + "\n")
    return path


def docker_config(auths: dict[str, dict[str, str]]) -> str:
    return json.dumps({"auths": auths})


# -- the plain forms --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "header"),
    [
        (f"alice:{PASSWORD}", basic_header("alice", PASSWORD)),
        (f"Basic {b64('alice:' + PASSWORD)}", basic_header("alice", PASSWORD)),
        ("Bearer abc.def", "Bearer abc.def"),
        ("bearer abc.def", "Bearer abc.def"),
        ("abc.def", "Bearer abc.def"),
    ],
)
def test_plain_auth_files_give_a_header_for_any_host(
    tmp_path: Path, content: str, header: str
) -> None:
    credentials = load_auth_file(auth_file(tmp_path, content))

    assert credentials.authorization_for("images.example.com") == header
    assert credentials.authorization_for("other.example:8443") == header


def test_a_basic_header_is_decoded_so_a_token_realm_can_use_it(tmp_path: Path) -> None:
    credentials = load_auth_file(auth_file(tmp_path, f"Basic {b64('alice:' + PASSWORD)}"))

    login = credentials.login_for("registry.example")

    assert login == RegistryLogin(username="alice", password=PASSWORD)


@pytest.mark.parametrize("content", ["Basic !!!notbase64", f"Basic {b64('no-colon')}"])
def test_a_broken_basic_header_is_a_usage_error_without_its_content(
    tmp_path: Path, content: str
) -> None:
    with pytest.raises(UsageError) as caught:
        load_auth_file(auth_file(tmp_path, content))

    assert content.split()[1] not in caught.value.message


@pytest.mark.parametrize("content", ["", "   \n"])
def test_an_empty_auth_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "auth"
    path.write_text(content)

    with pytest.raises(UsageError, match="empty"):
        load_auth_file(path)


def test_a_missing_auth_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    with pytest.raises(UsageError, match="cannot read auth file") as caught:
        load_auth_file(missing)

    assert str(missing) in caught.value.message
    assert caught.value.exit_code == 2


# -- Docker config JSON -----------------------------------------------------------------------


def test_docker_config_auth_entries_apply_to_their_registry_only(tmp_path: Path) -> None:
    content = docker_config(
        {
            "registry.example:5000": {"auth": b64(f"alice:{PASSWORD}")},
            "https://other.example/v1/": {"username": "bob", "password": "hunter2"},
        }
    )

    credentials = load_auth_file(auth_file(tmp_path, content))

    assert credentials.login_for("registry.example:5000") == RegistryLogin("alice", PASSWORD)
    assert credentials.login_for("OTHER.example") == RegistryLogin("bob", "hunter2")
    assert credentials.login_for("registry.example") is None  # another port, another registry
    assert credentials.authorization_for("unrelated.example") is None


def test_docker_config_identity_and_registry_tokens(tmp_path: Path) -> None:
    content = docker_config(
        {
            # What `docker login` writes for an OAuth login: "<token>:" in auth.
            "idp.example": {"auth": b64("<token>:"), "identitytoken": "refresh-123"},
            "tok.example": {"registrytoken": "reg-456"},
        }
    )

    credentials = load_auth_file(auth_file(tmp_path, content))

    idp = credentials.login_for("idp.example")
    assert idp is not None
    assert idp.identity_token == "refresh-123"
    assert not idp.has_password
    assert credentials.authorization_for("tok.example") == "Bearer reg-456"


def test_docker_hub_credentials_are_found_under_the_index_url(tmp_path: Path) -> None:
    content = docker_config({"https://index.docker.io/v1/": {"auth": b64("alice:pw")}})

    credentials = load_auth_file(auth_file(tmp_path, content))

    assert credentials.login_for("registry-1.docker.io") == RegistryLogin("alice", "pw")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"auths": ', "invalid JSON"),
        ("{}", "no 'auths'"),
        ('{"credsStore": "desktop"}', "credential helpers"),
        ('{"auths": {"r.example": "x"}}', "not an object"),
        ('{"auths": {"r.example": {}}}', "has no credentials"),
        ('{"auths": {"r.example": {"auth": "%%%"}}}', "not valid base64"),
    ],
)
def test_broken_docker_configs_are_usage_errors(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_auth_file(auth_file(tmp_path, content))


def test_no_secret_appears_in_repr(tmp_path: Path) -> None:
    content = docker_config({"r.example": {"username": "alice", "password": PASSWORD}})

    credentials = load_auth_file(auth_file(tmp_path, content))

    assert PASSWORD not in repr(credentials)
    assert "alice" in repr(credentials)


@pytest.mark.parametrize(
    ("key", "normalised"),
    [
        ("registry.example:5000", "registry.example:5000"),
        ("https://Registry.Example:5000/v2/", "registry.example:5000"),
        ("http://r.example", "r.example"),
        ("r.example/some/path", "r.example"),
    ],
)
def test_registry_keys_are_normalised(key: str, normalised: str) -> None:
    assert normalise_registry(key) == normalised


# -- Secret directories -----------------------------------------------------------------------


def secret_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    directory = tmp_path / "secret"
    directory.mkdir()
    for name, content in files.items():
        (directory / name).write_text(content)
    return directory


def test_a_dockerconfigjson_secret(tmp_path: Path) -> None:
    directory = secret_dir(
        tmp_path,
        {".dockerconfigjson": docker_config({"registry.example": {"auth": b64("alice:pw")}})},
    )

    assert load_secret_dir(directory).login_for("registry.example") == RegistryLogin("alice", "pw")


def test_a_legacy_dockercfg_secret(tmp_path: Path) -> None:
    directory = secret_dir(
        tmp_path, {".dockercfg": json.dumps({"registry.example": {"auth": b64("alice:pw")}})}
    )

    assert load_secret_dir(directory).authorization_for("registry.example") == basic_header(
        "alice", "pw"
    )


def test_a_basic_auth_secret(tmp_path: Path) -> None:
    # Secret values written by `kubectl create secret` carry no newline; edited ones may.
    directory = secret_dir(tmp_path, {"username": "alice", "password": f"{PASSWORD}\n"})

    credentials = load_secret_dir(directory)

    assert credentials == Credentials(login=RegistryLogin("alice", PASSWORD))


def test_a_token_secret(tmp_path: Path) -> None:
    directory = secret_dir(tmp_path, {"token": "tok-789"})

    assert load_secret_dir(directory).authorization_for("anything.example") == "Bearer tok-789"


def test_an_unusable_secret_names_the_keys_it_wants(tmp_path: Path) -> None:
    directory = secret_dir(tmp_path, {"username": "alice"})

    with pytest.raises(UsageError, match=r"\.dockerconfigjson.*username\+password.*token"):
        load_secret_dir(directory)


def test_a_missing_secret_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a directory"):
        load_secret_dir(tmp_path / "absent")
