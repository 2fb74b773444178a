"""Small seeded architectures for the pruning tests: each is (name, model, input maker)."""

from __future__ import annotations

import torch
from torch import nn

from tests import user_models
from tests.models import tiny_cnn, tiny_llama


class ConcatResidualNet(nn.Module):
    """Two conv branches concatenated, a 1x1 conv, a residual add and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.SiLU())
        self.mix = nn.Sequential(nn.Conv2d(10, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        x = torch.relu(x + y)
        return self.head(x.mean(dim=(2, 3)))


class DepthwiseNet(nn.Module):
    """MobileNet-style: pointwise, depthwise (x2 multiplier), grouped conv, GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.grouped = nn.Sequential(
            nn.Conv2d(16, 12, 3, padding=1, groups=4), nn.GroupNorm(4, 12), nn.GELU()
        )
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = self.grouped(self.dw(self.pw(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def vgg() -> nn.Module:
    layers, c = [], 3
    for width in (8, 12):
        layers += [
            nn.Conv2d(c, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        c = width
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 16),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(16, 3),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 24), nn.Sigmoid(), nn.Linear(24, 2)
    )


class ViTBlock(nn.Module):
    """Pre-norm transformer block with nn.MultiheadAttention and an MLP, then a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.ln1, self.ln2 = nn.LayerNorm(16), nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class RecurrentClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module], layers: int) -> None:
        super().__init__()
        self.rnn = cell(6, 12, num_layers=layers, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


class ConvAutoencoder(nn.Module):
    """Conv encoder, ConvTranspose2d decoder with GroupNorm; the image is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.ReLU()
        )
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(8, 6, 2, stride=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 1, 1)
        )

    def forward(self, x):
        return self.dec(self.enc(x))


class TextClassifier(nn.Module):
    """Embedding -> linear -> SwiGLU gate -> linear, mean pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.gate, self.up, self.down = nn.Linear(16, 24), nn.Linear(16, 24), nn.Linear(24, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, ids):
        x = self.emb(ids)
        x = self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        return self.out(x.mean(1))


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def _warm_bn(model: nn.Module, make) -> nn.Module:
    """Run a few batches in train mode so BatchNorm statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            args = make(8)
            model(*args) if isinstance(args, tuple) else model(**args)
    return model.eval()


def image(c, size=12):
    return lambda b: (torch.randn(b, c, size, size),)


ARCHITECTURES = {
    "fmnist_resnet": (lambda: tiny_cnn(), lambda b: (torch.randn(b, 1, 28, 28),)),
    "concat_residual": (ConcatResidualNet, image(3)),
    "depthwise": (DepthwiseNet, image(3)),
    "vgg": (vgg, image(3, 16)),
    "mlp": (mlp, lambda b: (torch.randn(b, 10),)),
    "vit_block": (ViTBlock, lambda b: (torch.randn(b, 7, 6),)),
    "gru": (lambda: RecurrentClassifier(nn.GRU, 1), lambda b: (torch.randn(b, 5, 6),)),
    "lstm": (lambda: RecurrentClassifier(nn.LSTM, 2), lambda b: (torch.randn(b, 5, 6),)),
    "conv_autoencoder": (ConvAutoencoder, image(1, 8)),
    "text_swiglu": (TextClassifier, lambda b: (torch.randint(0, 50, (b, 9)),)),
    "llama_gqa": (
        lambda: tiny_llama(tie=True),
        lambda b: {"input_ids": torch.randint(0, 96, (b, 6)), "use_cache": False},
    ),
    # called as users call it, with plain token ids: kompakt turns off the cache it returns
    "llama_plain_ids": (lambda: tiny_llama(tie=True), lambda b: (torch.randint(0, 96, (b, 6)),)),
    "bert": (tiny_bert, lambda b: {"input_ids": torch.randint(0, 64, (b, 6))}),
    # the models tests/user_models.py builds as a user would, registered nowhere
    **{
        f"user:{name}": (
            getattr(user_models, name),
            lambda b, name=name: (user_models.INPUTS[name](b),),
        )
        for name in sorted(user_models.INPUTS)
    },
}


def build(name: str, seed: int = 0):
    factory, make = ARCHITECTURES[name]
    torch.manual_seed(seed)
    model = factory()
    return _warm_bn(model, make), make
