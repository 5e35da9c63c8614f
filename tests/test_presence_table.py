"""flowcore.presence with plain values: a server's Ledger and the engine-side PresenceTable
(JOIN/LEAVE, leave delay, leases, versions), no I/O."""

from __future__ import annotations

from flowcore.presence import Ledger, PresenceEvent, PresenceTable

DOC = "\0doc:1"


def kinds(events: list[PresenceEvent]) -> list[tuple[str, str]]:
    return [(e.kind, e.user) for e in events]


def test_ledger_reports_absolute_counts_of_what_changed():
    ledger = Ledger()
    ledger.add("alice")
    ledger.add("alice")
    ledger.add(DOC, "alice")
    assert ledger.take_changes() == {("alice", ""): 2, (DOC, "alice"): 1}
    assert ledger.take_changes() == {}
    ledger.add("alice", delta=-2)
    ledger.add("bob")
    assert ledger.take_changes() == {("alice", ""): 0, ("bob", ""): 1}
    assert ledger.full() == {(DOC, "alice"): 1, ("bob", ""): 1}
    assert not ledger.changed


def test_join_once_over_servers_and_tabs_and_leave_only_after_the_delay():
    table = PresenceTable(leave_delay=10, version_base=1000)
    assert kinds(table.report("s1", {(DOC, "alice"): 1}, now=0, full=True)) == [("JOIN", "alice")]
    assert table.report("s2", {(DOC, "alice"): 1}, now=1, full=True) == []  # a second tab elsewhere
    assert table.snapshot(DOC).users == {"alice": 2}
    assert table.report("s1", {(DOC, "alice"): 0}, now=2) == []
    assert table.report("s2", {(DOC, "alice"): 0}, now=3) == []  # the last one: LEAVE pending
    assert table.snapshot(DOC).users == {"alice": 0}  # still present during the delay
    assert table.tick(now=12.9) == []
    assert kinds(table.tick(now=13)) == [("LEAVE", "alice")]
    assert table.snapshot(DOC).count == 0 and table.channels == {}


def test_coming_back_within_the_delay_makes_neither_leave_nor_join():
    table = PresenceTable(leave_delay=10, version_base=0)
    table.report("s1", {(DOC, "bob"): 1}, now=0, full=True)
    table.report("s1", {(DOC, "bob"): 0}, now=1)
    assert table.report("s2", {(DOC, "bob"): 1}, now=5, full=True) == []  # the reload's new socket
    assert table.tick(now=12) == []  # past the delay (and s1's lease), within s2's
    assert table.snapshot(DOC).users == {"bob": 1}


def test_no_leave_delay_leaves_at_once():
    table = PresenceTable(leave_delay=0, version_base=0)
    table.report("s1", {(DOC, "bob"): 1}, now=0, full=True)
    assert kinds(table.report("s1", {(DOC, "bob"): 0}, now=1)) == [("LEAVE", "bob")]


def test_a_channel_goes_with_its_last_user_at_once_without_a_leave_delay():
    table = PresenceTable(leave_delay=0, version_base=0)
    table.report("s1", {(DOC, "bob"): 1, (DOC, "eve"): 1}, now=0, full=True)
    table.report("s1", {(DOC, "bob"): 0}, now=1)
    assert list(table.channels) == [DOC]
    table.report("s1", {(DOC, "eve"): 0}, now=2)
    assert table.channels == {}  # no tick needed
    assert table.snapshot(DOC).count == 0


def test_the_tick_finds_each_due_leave_among_many_quiet_channels():
    """The tick looks only at channels with a LEAVE pending; many channels whose users
    stay, a rejoin within the delay and a leave that comes due all come out right."""
    table = PresenceTable(leave_delay=10, version_base=0, lease_ttl=1000)
    quiet = {(f"\0page:{i}", f"u{i}"): 1 for i in range(2000)}
    table.report("s1", {**quiet, (DOC, "bob"): 1, (DOC, "eve"): 1}, now=0, full=True)
    table.report("s1", {(DOC, "bob"): 0, ("\0page:7", "u7"): 0}, now=1)
    table.report("s1", {("\0page:7", "u7"): 1}, now=2)  # back within the delay
    assert table.tick(now=5) == []
    assert kinds(table.tick(now=11)) == [("LEAVE", "bob")]
    assert table.tick(now=12) == []
    table.report("s1", {(DOC, "eve"): 0}, now=20)
    assert kinds(table.tick(now=30)) == [("LEAVE", "eve")]
    assert DOC not in table.channels and len(table.channels) == 2000
    assert table.snapshot("\0page:7").users == {"u7": 1}


def test_versions_rise_with_every_change_and_across_channels():
    table = PresenceTable(leave_delay=0, version_base=500)
    seen = []
    for now, (key, count) in enumerate([((DOC, "a"), 1), ((DOC, "a"), 2), (("\0x", "b"), 1), ((DOC, "a"), 0)]):
        table.report("s1", {key: count}, now=now, full=now == 0)
        seen.append(table.snapshot(key[0]).version)
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[0] > 500
    # An emptied and refilled channel goes on from the table's counter, not from the base.
    table.report("s1", {(DOC, "a"): 1}, now=10)
    assert table.snapshot(DOC).version > max(seen)


def test_a_server_whose_lease_runs_out_loses_its_counts():
    table = PresenceTable(leave_delay=5, version_base=0, lease_ttl=10)
    table.report("s1", {(DOC, "carol"): 1, ("carol", ""): 1, ("*", ""): 1}, now=0, full=True)
    table.report("s2", {(DOC, "dave"): 1, ("dave", ""): 1, ("*", ""): 1}, now=0, full=True)
    assert table.renew("s2", now=8)
    assert table.tick(now=10) == []  # s1 expired: carol's LEAVE is pending
    assert table.online("carol") == 0 and table.online("*") == 1 and not table.known("s1")
    assert kinds(table.tick(now=15)) == [("LEAVE", "carol")]
    assert table.online("dave") == 1 and table.snapshot(DOC).users == {"dave": 1}
    assert not table.renew("s1", now=16)  # it must report in full


def test_a_full_report_replaces_what_the_server_had():
    table = PresenceTable(leave_delay=0, version_base=0)
    table.report("s1", {(DOC, "a"): 1, (DOC, "b"): 1}, now=0, full=True)
    assert kinds(table.report("s1", {(DOC, "b"): 1, (DOC, "c"): 1}, now=1, full=True)) == [
        ("LEAVE", "a"), ("JOIN", "c")]
    assert kinds(table.drop_server("s1", now=2)) == [("LEAVE", "b"), ("LEAVE", "c")]


def test_snapshot_over_the_limit_gives_the_count_only():
    table = PresenceTable(leave_delay=0, version_base=0)
    table.report("s1", {(DOC, u): 1 for u in "abcd"}, now=0, full=True)
    big = table.snapshot(DOC, limit=3)
    assert big.users is None and big.count == 4
    assert table.snapshot(DOC, limit=4).users == {u: 1 for u in "abcd"}


def test_online_counts_sockets_over_servers():
    table = PresenceTable(leave_delay=0, version_base=0)
    table.report("s1", {("alice", ""): 2, ("*", ""): 2, (DOC, ""): 1}, now=0, full=True)
    table.report("s2", {("alice", ""): 1, ("*", ""): 3}, now=0, full=True)
    assert (table.online("alice"), table.online("*"), table.online(DOC), table.online("nobody")) == (3, 5, 1, 0)
    table.report("s2", {("alice", ""): 0}, now=1)
    assert table.online("alice") == 2


def test_presence_settings_are_checked_at_load(tmp_path):
    import pytest

    from flowcore.settings import SettingsError, load_settings

    base = {"FLOW_ENV_FILE": str(tmp_path / "none"), "FLOW_SECRET_FILE": str(tmp_path / "none")}
    settings = load_settings({**base, "FLOW_PRESENCE_CHANNELS": " doc:* , lobby ", "FLOW_PRESENCE_LEASE": "2",
                              "FLOW_PRESENCE_LEAVE_DELAY": "0", "FLOW_PRESENCE_MAX_LIST": "5"})
    assert settings.presence_channels == ("doc:*", "lobby")
    assert (settings.presence_lease, settings.presence_leave_delay, settings.presence_max_list) == (2.0, 0.0, 5)
    for name, value in (("FLOW_PRESENCE_CHANNELS", "doc:**"), ("FLOW_PRESENCE_LEASE", "0.1"),
                        ("FLOW_PRESENCE_LEAVE_DELAY", "-1"), ("FLOW_PRESENCE_MAX_LIST", "many")):
        with pytest.raises(SettingsError, match=name):
            load_settings({**base, name: value})


def test_a_restarted_table_rebuilds_without_join_or_leave_then_asks_for_fresh_snapshots():
    table = PresenceTable(leave_delay=0, version_base=0, lease_ttl=10, started=0.0)
    # Servers an earlier table knew report "again": the users never left, no JOIN.
    assert table.report("s1", {(DOC, "a"): 1}, now=1, full=True, again=True) == []
    assert table.report("s2", {(DOC, "b"): 1}, now=2, full=True, again=True) == []
    assert table.snapshot(DOC).users == {"a": 1, "b": 1}
    assert not table.end_rebuild(now=3)
    assert table.end_rebuild(now=5) and not table.end_rebuild(now=6)  # once
    assert kinds(table.report("s1", {(DOC, "c"): 1}, now=7)) == [("JOIN", "c")]
    # An old table: "again" is a server whose lease ran out, its users JOIN as usual.
    old = PresenceTable(leave_delay=0, version_base=0, lease_ttl=10, started=0.0)
    assert kinds(old.report("s1", {(DOC, "a"): 1}, now=50, full=True, again=True)) == [("JOIN", "a")]
