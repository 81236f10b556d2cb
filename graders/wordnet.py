"""WordNet for METEOR, offline.

NLTK's `nltk.download("wordnet")` needs the web, which these machines cannot reach. The same
database, WordNet 3.0, ships in Debian's `wordnet-base` package (`apt-get install
--no-install-recommends wordnet-base`, files in /usr/share/wordnet). It lacks one small file NLTK's
reader wants, `lexnames` (the 45 fixed lexicographer file names of WordNet 3.0, written below),
and NLTK only reads data under its data path. So on first use we copy the dict files into
`<cache>/nltk_data/corpora/wordnet-3.0-debian/`, write `lexnames`, add that root to
`nltk.data.path` and open it with NLTK's own `WordNetCorpusReader`.

Where the data is looked for, in order:
1. NLTK's own `corpora/wordnet` (a user who ran `nltk.download("wordnet")` gets exactly the data
   the hosted platform's image has);
2. a WordNet 3.0 dict folder: `$WNSEARCHDIR`, /usr/share/wordnet (Debian/Ubuntu),
   /usr/local/share/wordnet, /opt/homebrew/share/wordnet, /usr/local/WordNet-3.0/dict.

`load_wordnet()` returns None when none is found; METEOR then matches exact words and Porter stems
only (see docs/graders.md for the measured difference).
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

DICT_FILES = (
    "adj.exc", "adv.exc", "noun.exc", "verb.exc", "cntlist.rev",
    "data.adj", "data.adv", "data.noun", "data.verb",
    "index.adj", "index.adv", "index.noun", "index.verb",
)
DICT_DIRS = (
    "/usr/share/wordnet",
    "/usr/local/share/wordnet",
    "/opt/homebrew/share/wordnet",
    "/usr/local/WordNet-3.0/dict",
)

# WordNet 3.0's lexicographer files (lexnames(5WN)): number, name, syntactic category.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

_lock = threading.Lock()
_cached: dict[str, Any] = {}


def cache_dir() -> Path:
    """Where derived data lives: $GRADERS_CACHE_DIR, else the user cache dir + /flywheel/graders."""
    if os.environ.get("GRADERS_CACHE_DIR"):
        return Path(os.environ["GRADERS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flywheel" / "graders"


def find_dict_dir() -> Path | None:
    """A folder holding the WordNet 3.0 database files, or None."""
    candidates = [os.environ["WNSEARCHDIR"]] if os.environ.get("WNSEARCHDIR") else []
    for folder in candidates + list(DICT_DIRS):
        path = Path(folder)
        if all((path / name).is_file() for name in DICT_FILES):
            return path
    return None


def lexnames_text() -> str:
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def _materialise(source: Path) -> Path:
    """Copy the dict files into an NLTK data root (once) and return that root."""
    root = cache_dir() / "nltk_data"
    target = root / "corpora" / "wordnet-3.0-debian"
    stamp = target / "SOURCE"
    if stamp.is_file() and stamp.read_text() == str(source):
        return root
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in DICT_FILES:
        shutil.copyfile(source / name, tmp / name)  # copies, not links: NLTK refuses symlinks out of its roots
    if (source / "index.sense").is_file():
        shutil.copyfile(source / "index.sense", tmp / "index.sense")
    (tmp / "lexnames").write_text(lexnames_text())
    (tmp / "SOURCE").write_text(str(source))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return root


def _reader_class() -> type:
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class DictWordNetReader(WordNetCorpusReader):
        """NLTK's reader over a plain WordNet 3.0 dict folder.

        NLTK maps sense ids to 3.0 through `index.sense` for its multilingual (OMW) functions;
        this database *is* 3.0 and has no OMW data, so the mapping is the identity (None).
        """

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return DictWordNetReader


def load_wordnet() -> Any | None:
    """A WordNet corpus reader usable by `nltk.translate.meteor_score`, or None if no data."""
    with _lock:
        if "reader" in _cached:
            return _cached["reader"]
        _cached["reader"] = reader = _load()
        return reader


def wordnet_source() -> str:
    """Where METEOR's synonyms come from: 'nltk_data', the dict folder, or 'none'."""
    load_wordnet()
    return _cached.get("source", "none")


def _load() -> Any | None:
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        _cached["source"] = "nltk_data"
        return wordnet
    except (LookupError, OSError):
        pass
    source = find_dict_dir()
    if source is None:
        return None
    try:
        root = _materialise(source)
    except OSError:
        return None
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": expected, no OMW
        reader = _reader_class()(str(root / "corpora" / "wordnet-3.0-debian"), None)
    _cached["source"] = str(source)
    return reader


class NoWordNet:
    """Stands in for WordNet when there is none: no synonyms, so METEOR matches exact + stem only."""

    def synsets(self, *args: Any, **kwargs: Any) -> list:
        return []
