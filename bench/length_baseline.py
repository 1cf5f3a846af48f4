#!/usr/bin/env python3
"""How much of the arena label is predictable from response lengths alone.

A 3-class logistic regression on [log-length difference, |difference|, mean log length] of the
two responses (characters over all turns), 5-fold cross-validated with the same shuffle as
bench/real_data.sh, against the class prior of each training split. Needs numpy.
Usage: bench/length_baseline.py [SAMPLE.csv]
"""
import csv
import json
import math
import random
import sys

import numpy as np


def chars(cell):
    try:
        turns = json.loads(cell)
        return sum(len(t or "") for t in turns) if isinstance(turns, list) else len(cell)
    except ValueError:
        return len(cell)


def fit(x, y, l2=1e-2, iters=3000, lr=0.1):
    w = np.zeros((x.shape[1], 3))
    onehot = np.eye(3)[y]
    for _ in range(iters):
        z = x @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= lr * (x.T @ (p - onehot) / len(y) + l2 * w)
    return w


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/arena-sample.csv"
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head, body = rows[0], rows[1:]
    random.Random(1234).shuffle(body)
    col = {name: i for i, name in enumerate(head)}
    feats, labels = [], []
    for r in body:
        la, lb = math.log1p(chars(r[col["response_a"]])), math.log1p(chars(r[col["response_b"]]))
        feats.append([la - lb, abs(la - lb), (la + lb) / 2])
        labels.append([int(float(r[col[c]])) for c in ("winner_model_a", "winner_model_b", "winner_tie")].index(1))
    x, y = np.array(feats), np.array(labels)
    folds = 5
    model_loss, prior_loss = np.zeros(len(y)), np.zeros(len(y))
    for k in range(folds):
        test = np.arange(len(y)) % folds == k
        mu, sd = x[~test].mean(0), x[~test].std(0)
        xs = np.hstack([np.ones((len(y), 1)), (x - mu) / sd])
        w = fit(xs[~test], y[~test])
        z = xs[test] @ w
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        model_loss[test] = -np.log(p[np.arange(test.sum()), y[test]])
        prior = np.bincount(y[~test], minlength=3) / (~test).sum()
        prior_loss[test] = -np.log(prior[y[test]])
    d = model_loss - prior_loss
    print(f"{len(y)} rows, {folds}-fold: length-only logistic regression log loss {model_loss.mean():.4f}, "
          f"class prior {prior_loss.mean():.4f}, difference {d.mean():+.4f} ± {d.std(ddof=1) / math.sqrt(len(d)):.4f}")


if __name__ == "__main__":
    main()
