"""Ctrl-C and SIGTERM during ``fit``: training stops after the current update, with a checkpoint; only the learner
acts on the signal, never a process it is still starting. Every signal handler of a run is here; the Lightning side
is ``callbacks.GracefulInterrupt`` (which stops every DDP rank after the same update), and ``python -m lit_impala``
(``__main__``) shields the start-up.

The stop: from ``stop_on_signals`` (when training starts, after Lightning installed its own SIGTERM handler, which
would skip the end-of-training checkpoint) the first SIGINT or SIGTERM is recorded (``received``) and the handlers
that were there before come back, so a second one acts at once (Ctrl-C: ``KeyboardInterrupt``). The command exits
with 128 + the signal's number (``exit_code``), the shell's convention for "ended by a signal".

The start-up shield. Ctrl-C in a terminal sends SIGINT to every process of the job: the learner, the other DDP
ranks Lightning launches, their actor processes, W&B's service. A child that receives it while it is still
importing (a DDP rank, an actor unpickling its policy) dies of ``KeyboardInterrupt``; Lightning's DDP launcher
then SIGKILLs every rank and no checkpoint is written. An ignored signal is the one disposition a process passes
on to the programs it starts (``multiprocessing``'s spawn and ``subprocess`` included), and Python keeps ignoring
it at start-up. So from ``fit``'s start until the first update (``unshield``), SIGINT is ignored and blocked in
the main thread (a blocked signal is kept although ignored), and a helper thread takes it with ``sigwait``: the
first is recorded as above; a second raises ``KeyboardInterrupt`` in the main thread. After the first update the
learner takes SIGINT itself again (its children are running by then).

Standard library only, Linux semantics (the kernel keeps an ignored signal that a thread blocks).
"""

from __future__ import annotations

import multiprocessing.resource_tracker
import signal
import sys
import threading

STOP_MESSAGE = "stopping after this update and writing a checkpoint (press Ctrl-C again to stop at once)"
# Carries "Ctrl-C again" from the helper thread into the main thread (which alone runs Python handlers).
_INTERRUPT_MAIN = signal.SIGUSR2

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: signal.Signals | None = None
_receiver: threading.Thread | None = None
_previous_handlers: dict[int, object] = {}  # the shield's
_before_stop: dict[int, object] = {}  # what handled the stop signals before stop_on_signals: back after the first


def shield_child_processes() -> None:
    """Until ``unshield``: processes started from here ignore Ctrl-C; this process records the first one.
    Call it before any thread is started (a thread started earlier, with SIGINT unblocked, would take
    the ignored signal and lose it). Main thread only (elsewhere: nothing changes)."""
    global _received, _receiver
    if _receiver is not None or threading.current_thread() is not threading.main_thread():
        return
    _received = None
    # multiprocessing's resource tracker unblocks SIGINT in the thread that first starts it: start it now.
    multiprocessing.resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # threads started from here on inherit it
    _previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    _previous_handlers[_INTERRUPT_MAIN] = signal.signal(_INTERRUPT_MAIN, _raise_keyboard_interrupt)
    _receiver = threading.Thread(target=_receive, daemon=True, name="ctrl-c-receiver")
    _receiver.start()


def is_fit(arguments: list[str]) -> bool:
    """Whether a command line (without the program) runs ``fit``."""
    return next((a for a in arguments if not a.startswith("-")), None) == "fit"


def stop_on_signals() -> None:
    """Until ``release``: the first SIGINT or SIGTERM is recorded (``received``), the next acts as before.
    Main thread only (elsewhere: nothing changes)."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        return
    if _receiver is None:
        _received = None  # a new run (the shield, if there is one, may have recorded a Ctrl-C already: kept)
    for signum in STOP_SIGNALS:
        if signum == signal.SIGINT and (_receiver is not None or _received is not None):
            continue  # the shield's helper thread records it; unshield installs the handler
        _before_stop[signum] = signal.signal(signum, _record)


def received() -> signal.Signals | None:
    """The stop signal recorded in this run, if one arrived."""
    return _received


def exit_code() -> int | None:
    """128 + the signal that stopped the run; None when none did."""
    return None if _received is None else 128 + _received.value


def shielded() -> bool:
    return _receiver is not None


def unshield() -> None:
    """The main thread takes SIGINT itself again: the first records, a second raises ``KeyboardInterrupt``."""
    global _receiver
    if _receiver is None:
        return
    receiver, _receiver = _receiver, None
    signal.pthread_kill(receiver.ident, signal.SIGINT)  # ends its sigwait; it sees it is no longer needed
    receiver.join(timeout=1.0)
    signal.signal(_INTERRUPT_MAIN, _previous_handlers.pop(_INTERRUPT_MAIN))
    _previous_handlers.pop(signal.SIGINT)
    if _received:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    else:
        _before_stop[signal.SIGINT] = signal.default_int_handler
        signal.signal(signal.SIGINT, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def release() -> None:
    """Training is over: the signals are handled as before ``stop_on_signals`` (Ctrl-C: ``KeyboardInterrupt``).
    ``received`` keeps its answer for the exit code."""
    unshield()
    _restore_handlers()


def _restore_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _before_stop.items():
        signal.signal(signum, handler)
    _before_stop.clear()


def _receive() -> None:
    while True:
        signal.sigwait({signal.SIGINT})
        if threading.current_thread() is not _receiver:
            return  # unshield woke us: the main thread takes SIGINT from now on
        if _received is None:
            _note(signal.SIGINT)
        else:
            # A real signal, not _thread.interrupt_main: it also wakes a main thread waiting in a system call.
            signal.pthread_kill(threading.main_thread().ident, _INTERRUPT_MAIN)


def _record(signum: int, frame) -> None:
    _note(signal.Signals(signum))
    _restore_handlers()  # a second signal acts at once


def _note(signum: signal.Signals) -> None:
    global _received
    _received = signum
    print(f"\n{signum.name}: {STOP_MESSAGE}", file=sys.stderr, flush=True)


def _raise_keyboard_interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt
