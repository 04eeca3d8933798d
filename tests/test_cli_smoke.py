from tmconvert.converter.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "tmconvert" in capsys.readouterr().out
