"""`FixedAnswers`: inside `fixed` each question (by the identity of the objects asked about) is
computed once per thread; outside it, and on other threads, every time."""

import threading

from hypothesis import given, strategies as st

from fxlora.tracing.memo import FixedAnswers


class Thing:
    """Equal to every other Thing: answers must go by identity, not equality."""

    def __eq__(self, other):
        return isinstance(other, Thing)

    __hash__ = object.__hash__


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=30))
def test_each_question_is_computed_once_inside_and_every_time_outside(questions):
    things = [Thing() for _ in range(4)]
    memo = FixedAnswers()
    computed = []

    def ask(i, j):
        return memo.answer((things[i], things[j]), lambda: computed.append((i, j)) or (i, j))

    with memo.fixed():
        with memo.fixed():  # nested: one table
            answers = [ask(i, j) for i, j in questions[: len(questions) // 2]]
        answers += [ask(i, j) for i, j in questions[len(questions) // 2 :]]
    assert answers == questions
    assert sorted(computed) == sorted(set(questions))
    computed.clear()
    assert [ask(i, j) for i, j in questions] == questions
    assert computed == questions


def test_other_threads_compute_their_own_answers():
    memo, thing = FixedAnswers(), Thing()
    computed = []
    entered, done = threading.Event(), threading.Event()

    def fixed_elsewhere():
        with memo.fixed():
            memo.answer((thing,), lambda: computed.append("there"))
            entered.set()
            done.wait(10)

    thread = threading.Thread(target=fixed_elsewhere)
    thread.start()
    assert entered.wait(10)
    memo.answer((thing,), lambda: computed.append("here"))
    memo.answer((thing,), lambda: computed.append("here"))
    done.set()
    thread.join()
    assert computed == ["there", "here", "here"]
