"""The direct_grpc port's claim directory (PortClaim) under a shared $TMPDIR: its name is known to every local user,
so it is used only when it is this user's own directory, no link, written by no one else."""

from __future__ import annotations

import os

import pytest

from elasticmoe.gateway.direct_ingress import PortClaim


def _claims(tmp_path):
    return tmp_path / f"elasticmoe-direct-grpc-{os.getuid()}"


def test_a_claim_directory_others_may_write_is_refused(tmp_path):
    """The directory's name is known to all: another user who made it first (writable to all) could hold a lock in
    it under another application's name, refusing every claim on the port, or drop links there."""
    _claims(tmp_path).mkdir()
    _claims(tmp_path).chmod(0o777)
    with pytest.raises(OSError) as e:
        PortClaim(9100, "a", tmp_path)
    assert str(_claims(tmp_path)) in str(e.value) and "mode 777" in str(e.value)
    assert os.listdir(_claims(tmp_path)) == []  # nothing made in it


def test_a_claim_directory_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    _claims(tmp_path).symlink_to(elsewhere)
    with pytest.raises(OSError) as e:
        PortClaim(9100, "a", tmp_path)
    assert str(_claims(tmp_path)) in str(e.value) and "not a directory of its own" in str(e.value)
    assert os.listdir(elsewhere) == []


@pytest.mark.skipif(os.getuid() != 0, reason="giving a directory to another user needs root")
def test_a_claim_directory_of_another_user_is_refused(tmp_path):
    _claims(tmp_path).mkdir(mode=0o700)
    os.chown(_claims(tmp_path), 54321, 54321)
    with pytest.raises(OSError) as e:
        PortClaim(9100, "a", tmp_path)
    assert "owned by uid 54321" in str(e.value)


def test_a_claim_in_its_own_directory_still_works_and_lets_go(tmp_path):
    first = PortClaim(9100, "a", tmp_path)
    assert (os.stat(_claims(tmp_path)).st_mode & 0o777) == 0o700
    second = PortClaim(9100, "a", tmp_path)  # the same application's replica shares it
    with pytest.raises(OSError, match="already served by application 'a'"):
        PortClaim(9100, "b", tmp_path)
    first.release()
    second.release()
    second.release()  # twice: nothing more to let go
    PortClaim(9100, "b", tmp_path).release()
