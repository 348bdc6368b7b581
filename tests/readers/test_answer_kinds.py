import pytest

from cepe_rag.readers.answer_kinds import (
    AnswerKind,
    answer_ending_tokens,
    answer_kind,
    may_begin,
    may_continue,
    name_going_on_tokens,
    wrong_kind_tokens,
)


@pytest.mark.parametrize("question, kind", [
    ("Where was Ilse Dinbreskel born?", AnswerKind.PROPER),
    ("In which city is the Virkdeisund Bridge?", AnswerKind.PROPER),
    ("who sings ain't nothing but a good time", AnswerKind.PROPER),
    ("Which organisation presents the Blesfyxis Prize?", AnswerKind.PROPER),
    ("In which field is the Blesfyxis Prize awarded?", AnswerKind.NAME),
    ("how many episodes are in one punch man season 1", AnswerKind.NUMBER),
    ("what age do you go to school in japan", AnswerKind.NUMBER),
    ("when did the eagles win last super bowl", AnswerKind.DATE),
    ("In what year was the bridge opened?", AnswerKind.DATE),
    ("What does Quolderkix Manufacturing manufacture?", AnswerKind.ANY),
    ("what is the star sign for september 15", AnswerKind.ANY),
    ("what happened when the war ended", AnswerKind.ANY),  # the first question word decides
    ("the last time la dodgers won the world series", AnswerKind.ANY),
])
def test_the_question_words_say_what_kind_of_answer_is_asked_for(question, kind):
    assert answer_kind(question) is kind


def test_each_kind_begins_with_its_own_words():
    assert may_begin(AnswerKind.NUMBER, "12") and may_begin(AnswerKind.NUMBER, "twelve")
    assert not may_begin(AnswerKind.NUMBER, "Sarah")
    assert may_begin(AnswerKind.DATE, "1988") and may_begin(AnswerKind.DATE, "June")
    assert not may_begin(AnswerKind.DATE, "Rowling")
    assert may_begin(AnswerKind.NAME, "Riothkenda") and not may_begin(AnswerKind.NAME, "2070")
    assert not may_begin(AnswerKind.NAME, "$7.25") and not may_begin(AnswerKind.NAME, "It")
    assert may_begin(AnswerKind.NAME, "typography") and may_begin(AnswerKind.PROPER, "Riothkenda")
    assert not any(may_begin(AnswerKind.PROPER, word) for word in ("annual", "opened", "The", "It", "1871"))
    assert may_begin(AnswerKind.ANY, "2070")


def test_an_answer_of_a_kind_begins_only_on_the_first_token_of_a_word_of_that_kind():
    text = "The bridge is 2070 metres long, in Riothkenda."
    offsets = [(0, 3), (3, 10), (10, 13), (13, 16), (16, 18), (18, 25), (25, 30), (30, 31), (31, 34), (34, 40),
               (40, 45), (45, 46)]  # " 20" + "70"; " Rioth" + "kenda"
    flags = wrong_kind_tokens(AnswerKind.NAME, text, offsets)
    assert [text[s:e] for (s, e), flag in zip(offsets, flags) if not flag] == \
        ["The", " bridge", " is", " metres", " long", " in", " Rioth"]
    flags = wrong_kind_tokens(AnswerKind.PROPER, text, offsets)
    assert [text[s:e] for (s, e), flag in zip(offsets, flags) if not flag] == [" Rioth"]
    flags = wrong_kind_tokens(AnswerKind.NUMBER, text, offsets)
    assert [text[s:e] for (s, e), flag in zip(offsets, flags) if not flag] == [" 20"]
    assert not any(wrong_kind_tokens(AnswerKind.ANY, text, offsets))


def test_an_extractive_answer_begins_with_a_word_of_the_asked_kind(chat_tokenizer):
    from cepe_rag.readers.extractive import span_constraint

    text = "The Telvik Bridge was designed by John Smith and opened in 1902."
    starts = {chat_tokenizer.decode([i]).strip()
              for i in span_constraint("Who designed the Telvik Bridge?", [text], chat_tokenizer).allowed()}
    assert "John" in starts and not any(s[:1].isdigit() or s[:1].islower() for s in starts), starts
    dates = {chat_tokenizer.decode([i]).strip()
             for i in span_constraint("When did the Telvik Bridge open?", [text], chat_tokenizer).allowed()}
    assert dates == {"1"}, dates  # "1902" is written digit by digit
    # no word of the asked kind in any passage: the kind is dropped rather than every answer
    anything = span_constraint("How many lanes does it have?", [text.replace(" in 1902", "")], chat_tokenizer).allowed()
    assert "John" in {chat_tokenizer.decode([i]).strip() for i in anything}


def test_a_proper_name_goes_on_only_through_words_of_a_name():
    assert may_continue(AnswerKind.PROPER, "Academy") and may_continue(AnswerKind.PROPER, "of")
    assert not may_continue(AnswerKind.PROPER, "and") and not may_continue(AnswerKind.PROPER, "Its")
    assert may_continue(AnswerKind.ANY, "and") and may_continue(AnswerKind.DATE, "and")
    text = "Its mayor is Ruben Kessel, and the Bank of Brannholm"
    offsets = [(0, 3), (3, 9), (9, 12), (12, 18), (18, 25), (25, 26), (26, 30), (30, 34), (34, 39), (39, 42), (42, 52)]
    flags = answer_ending_tokens(AnswerKind.PROPER, text, offsets)
    assert [text[s:e] for (s, e), flag in zip(offsets, flags) if flag] == ["Its", " mayor", " is", ",", " and", " the"]
    assert not any(answer_ending_tokens(AnswerKind.NUMBER, text, offsets))


def test_an_extractive_name_ends_where_the_passage_stops_naming(chat_tokenizer):
    from cepe_rag.readers.extractive import span_constraint

    text = "The Telvik Bridge was designed by John Smith and opened in 1902."
    constraint = span_constraint("Who designed the Telvik Bridge?", [text], chat_tokenizer)
    for token in ("ĠJohn", "ĠSmith"):
        constraint.advance(chat_tokenizer.convert_tokens_to_ids(token))
    assert constraint.may_end() and not len(constraint.allowed())  # not " and opened in 1902"
    anything = span_constraint("What is the Telvik Bridge?", [text], chat_tokenizer)
    for token in ("ĠJohn", "ĠSmith"):
        anything.advance(chat_tokenizer.convert_tokens_to_ids(token))
    assert [chat_tokenizer.decode([i]) for i in anything.allowed()] == [" and"]


def test_a_proper_name_may_not_end_while_the_next_word_still_names():
    text = "It was founded by the Miovvera Academy, then Ruben Kessel.\nHe"
    offsets = [(0, 2), (2, 6), (6, 14), (14, 17), (17, 21), (21, 30), (30, 38), (38, 39), (39, 44), (44, 50),
               (50, 57), (57, 58), (58, 59), (59, 61)]
    flags = name_going_on_tokens(AnswerKind.PROPER, text, offsets)
    # capitalised words straight after a word ("the", "then": no name ends there anyway), not after a comma ("then")
    # or a line break ("He"), nor a lower-case word ("founded")
    assert [text[s:e] for (s, e), flag in zip(offsets, flags) if flag] == [" Miovvera", " Academy", " Ruben", " Kessel"]
    assert not any(name_going_on_tokens(AnswerKind.NAME, text, offsets))


def test_an_extractive_organisation_is_not_cut_after_its_first_word(chat_tokenizer):
    from cepe_rag.readers.extractive import span_constraint

    text = "The Blesfyxis Prize is presented by the Miovvera Academy every year."
    constraint = span_constraint("Which organisation presents the Blesfyxis Prize?", [text], chat_tokenizer)
    first = [i for i in constraint.allowed() if chat_tokenizer.decode([i]).strip().startswith("Mi")]
    assert first, [chat_tokenizer.decode([i]) for i in constraint.allowed()]
    constraint.advance(first[0])
    while not chat_tokenizer.decode([int(constraint.allowed()[0])]).startswith(" Academy"):
        assert not constraint.may_end()  # inside "Miovvera", a word that has not ended
        constraint.advance(int(constraint.allowed()[0]))
    assert not constraint.may_end()  # "Miovvera" is a word, but the name goes on into " Academy"
    constraint.advance(int(constraint.allowed()[0]))
    assert constraint.may_end() and not len(constraint.allowed())  # and ends before " every"
