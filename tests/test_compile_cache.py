"""The persistent compile cache (table2text.training.compile_cache): the stated folder, unless the user chose one."""

from table2text.training import compile_cache


def test_the_project_folder_is_used_and_made(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    folder = compile_cache.use_compile_cache()
    assert folder == (tmp_path / ".cache" / "torch-compile").resolve() and folder.is_dir()
    import os

    assert os.environ[compile_cache.ENV] == str(folder)  # what inductor reads (torch._inductor cache_dir)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(folder)


def test_a_folder_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.use_compile_cache(tmp_path / "other") == tmp_path / "mine"
    assert not (tmp_path / "other").exists()
