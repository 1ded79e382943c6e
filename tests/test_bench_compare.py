"""bench.compare: a refactor's toy benchmark against the recorded one, speed aside."""

from bench.compare import differences, main


def test_a_changed_decoding_value_is_caught_and_speed_is_not():
    recorded = {"families": {"qwen": {"modes": {"lvspec": {"tau": 6.77, "tokens_per_s": 1117.2, "seconds": 3.1,
                                                            "shares": {"bonus": 0.07}}},
                                      "sweep": [{"tau": 1.0}, {"tau": 2.0}], "date": "2026-11-23"}}}
    rerun = {"families": {"qwen": {"modes": {"lvspec": {"tau": 6.77, "tokens_per_s": 901.0, "seconds": 4.0,
                                                         "shares": {"bonus": 0.07}}},
                                   "sweep": [{"tau": 1.0}, {"tau": 2.0}], "date": "2026-12-06"}}}
    assert differences(recorded, rerun) == (4, [])
    rerun["families"]["qwen"]["sweep"][1]["tau"] = 2.01
    rerun["families"]["qwen"]["modes"]["lvspec"]["k_costs"] = None  # a setting added since: one side only
    equal, diff = differences(recorded, rerun)
    assert equal == 3
    assert diff == [("/families/qwen/modes/lvspec/k_costs", "<absent>", None),
                    ("/families/qwen/sweep[1]/tau", 2.0, 2.01)]


def test_the_command_fails_only_on_a_changed_value(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text('{"tau": 2.0, "tokens_per_s": 10}')
    b.write_text('{"tau": 2.0, "tokens_per_s": 12, "new_setting": 1}')
    assert main([str(a), str(b)]) == 0
    b.write_text('{"tau": 2.5}')
    assert main([str(a), str(b)]) == 1
    assert "/tau: 2.0 -> 2.5" in capsys.readouterr().out
