"""The delivery ledger: which messages an instance handed to its sockets (server/bus/ledger.py)."""

from __future__ import annotations

from server.bus.ledger import DeliveryLedger


def test_each_message_is_delivered_once_even_out_of_order():
    ledger = DeliveryLedger()
    assert ledger.first_delivery("r", 5)
    assert not ledger.first_delivery("r", 5)  # the live copy after a catch-up, or vice versa
    assert ledger.first_delivery("r", 4)  # published by another instance, arrived later
    assert not ledger.first_delivery("r", 4)
    assert ledger.first_delivery("other", 5)  # rooms are separate


def test_missing_messages_lie_above_the_join_and_were_not_delivered():
    ledger = DeliveryLedger()
    assert ledger.catch_up_from("r") is None  # never seen: nothing to look for
    ledger.joined("r", 10)  # seqs up to 10 were the join's `missed`
    assert ledger.catch_up_from("r") == 10
    for seq in (11, 12, 14):
        assert ledger.first_delivery("r", seq)
    assert ledger.missing("r", [9, 10, 11, 12, 13, 14, 15]) == [13, 15]
    assert ledger.missing("unknown", [1, 2]) == []
    ledger.joined("r", 3)  # a later join does not lower what is known
    assert ledger.missing("r", [13]) == [13]


def test_catch_up_reads_only_a_reorder_window_below_the_highest_delivered():
    ledger = DeliveryLedger()
    ledger.joined("r", 0)
    for seq in range(1, 101):
        ledger.first_delivery("r", seq)
    assert ledger.catch_up_from("r", reorder=32) == 68
    assert ledger.catch_up_from("r", reorder=500) == 0  # never below the floor


def test_memory_is_bounded_per_room_and_in_rooms():
    ledger = DeliveryLedger(per_room=3, max_rooms=2)
    ledger.joined("r", 0)
    for seq in (1, 2, 3, 4):
        assert ledger.first_delivery("r", seq)
    # seq 1 was forgotten: the floor rose to it, so it is no longer looked for
    assert ledger.missing("r", [1, 2, 5]) == [5]
    ledger.first_delivery("a", 1)
    ledger.first_delivery("r", 5)  # "r" used more recently than "a"
    ledger.first_delivery("b", 1)
    assert len(ledger) == 2
    assert ledger.catch_up_from("a") is None
    assert ledger.catch_up_from("r") is not None
