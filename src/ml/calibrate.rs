//! Calibration of the classifier's probabilities, fitted after training.
//!
//! Two layers, both stored with the adapter and applied at prediction:
//! - one softmax temperature fitted on the validation split (golden-section search);
//! - a response-length model stacked on the logits: a 3-class logistic regression on the two
//!   responses' lengths, fitted on the training rows, then `z = s·logits + c·length_logits`
//!   with the two mixing weights `s, c` fitted on the validation split. In the arena the longer
//!   answer wins more often; a small classifier trained on a few hundred rows does not pick that
//!   up by itself, and the combination never scores worse on validation than either part.

use serde::{Deserialize, Serialize};

use super::classifier;
use crate::data::ArenaRow;

/// Validation log loss before and after calibration.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Calibration {
    pub temperature: f64,
    pub log_loss_before: f64,
    pub log_loss_after: f64,
    /// Validation log loss with the length model stacked on (absent when not fitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_loss_with_lengths: Option<f64>,
}

/// Mean negative log-likelihood of the labels (the evaluation's log loss).
fn log_loss(probs: impl Iterator<Item = [f32; 3]>, labels: &[usize]) -> f64 {
    let probs: Vec<[f32; 3]> = probs.collect();
    super::train::metrics(&probs, labels).log_loss
}

/// Fit one softmax temperature minimising log loss (golden-section search on log T in
/// [0.05, 20]), with a standard normal prior on log T: the mean log loss plus
/// `(ln T)² / (2n)` over `n` rows. A few rows the classifier happens to get right would
/// otherwise drive T to its floor, and every later mistake would cost about 20 times the
/// logit; on hundreds of rows the prior weighs nothing.
pub fn fit_temperature(logits: &[[f32; 3]], labels: &[usize]) -> Calibration {
    let loss = |t: f64| log_loss(logits.iter().map(|l| classifier::softmax3(l, t)), labels);
    let n = labels.len().max(1) as f64;
    let objective = |log_t: f64| loss(log_t.exp()) + log_t * log_t / (2.0 * n);
    let (mut lo, mut hi) = ((0.05f64).ln(), (20.0f64).ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (hi - g * (hi - lo), lo + g * (hi - lo));
    let (mut fc, mut fd) = (objective(c), objective(d));
    for _ in 0..60 {
        if fc < fd {
            hi = d;
            d = c;
            fd = fc;
            c = hi - g * (hi - lo);
            fc = objective(c);
        } else {
            lo = c;
            c = d;
            fc = fd;
            d = lo + g * (hi - lo);
            fd = objective(d);
        }
    }
    let t = ((lo + hi) / 2.0).exp();
    Calibration { temperature: t, log_loss_before: loss(1.0), log_loss_after: loss(t), log_loss_with_lengths: None }
}

/// Characters over all turns of a response.
fn chars(turns: &[String]) -> usize {
    turns.iter().map(|t| t.chars().count()).sum()
}

/// `[ln(1+|A|) − ln(1+|B|), its absolute value, the mean of the two]`, lengths in characters.
pub fn length_features(row: &ArenaRow) -> [f64; 3] {
    let a = (chars(&row.response_a) as f64).ln_1p();
    let b = (chars(&row.response_b) as f64).ln_1p();
    [a - b, (a - b).abs(), (a + b) / 2.0]
}

/// The features of the same pair with A and B swapped.
pub fn mirrored(f: [f64; 3]) -> [f64; 3] {
    [-f[0], f[1], f[2]]
}

/// A 3-class logistic regression on standardised [`length_features`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthModel {
    pub mean: [f64; 3],
    pub scale: [f64; 3],
    /// `weights[j][k]`: feature `j` (0 is the bias) for class `k` (A, B, tie).
    pub weights: [[f64; 3]; 4],
}

/// L2 penalty of the length model (on standardised features).
const LENGTH_L2: f64 = 1e-2;

/// Fewest labelled rows the length model is fitted on, and the fewest validation rows its
/// weight is fitted on: below that a dozen weights (or the stacking weights) fit noise.
pub const MIN_LENGTH_ROWS: usize = 20;

/// Standardised features are clamped to this many standard deviations, so a pair far outside
/// the training lengths (a one-word answer against a page) is not extrapolated linearly into
/// near-certain probabilities.
const MAX_Z: f64 = 4.0;

impl LengthModel {
    /// Fit on labelled rows; `None` with fewer than [`MIN_LENGTH_ROWS`].
    pub fn fit(rows: &[(&ArenaRow, usize)]) -> Option<LengthModel> {
        if rows.len() < MIN_LENGTH_ROWS {
            return None;
        }
        let feats: Vec<[f64; 3]> = rows.iter().map(|(r, _)| length_features(r)).collect();
        let n = feats.len() as f64;
        let mut mean = [0.0; 3];
        let mut scale = [0.0; 3];
        for j in 0..3 {
            mean[j] = feats.iter().map(|f| f[j]).sum::<f64>() / n;
            let var = feats.iter().map(|f| (f[j] - mean[j]).powi(2)).sum::<f64>() / n;
            scale[j] = if var > 1e-12 { var.sqrt() } else { 1.0 };
        }
        // class k's feature vector: the row's [1, standardised features] in block k of 12
        let x: Vec<[Vec<f64>; 3]> = feats
            .iter()
            .map(|f| {
                let z = standardised(f, &mean, &scale);
                std::array::from_fn(|k| {
                    let mut v = vec![0.0; 12];
                    v[4 * k..4 * k + 4].copy_from_slice(&z);
                    v
                })
            })
            .collect();
        let y: Vec<usize> = rows.iter().map(|(_, l)| *l).collect();
        let theta = fit_conditional_logit(&x, &y, LENGTH_L2, vec![0.0; 12]);
        let weights = std::array::from_fn(|j| std::array::from_fn(|k| theta[4 * k + j]));
        Some(LengthModel { mean, scale, weights })
    }

    /// The model's logits for a row's [`length_features`].
    pub fn logits(&self, f: &[f64; 3]) -> [f64; 3] {
        let z = standardised(f, &self.mean, &self.scale);
        std::array::from_fn(|k| (0..4).map(|j| self.weights[j][k] * z[j]).sum())
    }
}

/// `[1, z_0, z_1, z_2]`: the features standardised and clamped to `±MAX_Z`.
fn standardised(f: &[f64; 3], mean: &[f64; 3], scale: &[f64; 3]) -> [f64; 4] {
    let z = |j: usize| ((f[j] - mean[j]) / scale[j]).clamp(-MAX_Z, MAX_Z);
    [1.0, z(0), z(1), z(2)]
}

/// The length model stacked on the classifier: `z = logit_scale·logits + length_scale·length`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LengthCalibration {
    pub logit_scale: f64,
    pub length_scale: f64,
    pub model: LengthModel,
}

/// Largest weight on the classifier's logits (the inverse of the smallest temperature, 0.05).
const MAX_LOGIT_SCALE: f64 = 20.0;

impl LengthCalibration {
    /// Fit the mixing weights on the validation rows' logits, the length model being fitted
    /// already (on the training rows). The weight on the logits stays in `[0, 20]`. `None` with
    /// fewer than [`MIN_LENGTH_ROWS`] rows.
    pub fn fit(model: LengthModel, logits: &[[f32; 3]], rows: &[(&ArenaRow, usize)]) -> Option<LengthCalibration> {
        if rows.len() < MIN_LENGTH_ROWS {
            return None;
        }
        let lens: Vec<[f64; 3]> = rows.iter().map(|(r, _)| model.logits(&length_features(r))).collect();
        let y: Vec<usize> = rows.iter().map(|(_, l)| *l).collect();
        let x: Vec<[Vec<f64>; 3]> = logits
            .iter()
            .zip(&lens)
            .map(|(l, m)| std::array::from_fn(|k| vec![l[k] as f64, m[k]]))
            .collect();
        let theta = fit_conditional_logit(&x, &y, 1e-6, vec![0.0, 1.0]);
        let (logit_scale, length_scale) = if (0.0..=MAX_LOGIT_SCALE).contains(&theta[0]) {
            (theta[0], theta[1])
        } else {
            // the optimum lies outside: pin the logit weight at the nearer bound, refit the other
            let s = theta[0].clamp(0.0, MAX_LOGIT_SCALE);
            let x1: Vec<[Vec<f64>; 3]> = x.iter().map(|c| std::array::from_fn(|k| vec![c[k][1]])).collect();
            let offsets: Vec<[f64; 3]> = x.iter().map(|c| std::array::from_fn(|k| s * c[k][0])).collect();
            let c = fit_conditional_logit_offset(&x1, &offsets, &y, 1e-6, vec![1.0]);
            (s, c[0])
        };
        Some(LengthCalibration { logit_scale, length_scale, model })
    }

    /// Calibrated logits of one row, given its [`length_features`] (softmax them for
    /// probabilities).
    pub fn apply(&self, logits: &[f32; 3], features: &[f64; 3]) -> [f32; 3] {
        let m = self.model.logits(features);
        std::array::from_fn(|k| (self.logit_scale * logits[k] as f64 + self.length_scale * m[k]) as f32)
    }
}

/// Calibrated logits: the stacked length model when there is one, else `logits / temperature`.
pub fn calibrated_logits(
    temperature: f64,
    lengths: Option<&LengthCalibration>,
    logits: &[f32; 3],
    features: &[f64; 3],
) -> [f32; 3] {
    match lengths {
        Some(c) => c.apply(logits, features),
        None => {
            let t = temperature.max(1e-6) as f32;
            logits.map(|l| l / t)
        }
    }
}

/// Validation log loss of the stacked model.
pub fn length_log_loss(c: &LengthCalibration, logits: &[[f32; 3]], rows: &[(&ArenaRow, usize)]) -> f64 {
    let labels: Vec<usize> = rows.iter().map(|(_, l)| *l).collect();
    log_loss(logits.iter().zip(rows).map(|(l, (r, _))| classifier::softmax3(&c.apply(l, &length_features(r)), 1.0)), &labels)
}

fn fit_conditional_logit(x: &[[Vec<f64>; 3]], y: &[usize], l2: f64, init: Vec<f64>) -> Vec<f64> {
    let zero = vec![[0.0; 3]; x.len()];
    fit_conditional_logit_offset(x, &zero, y, l2, init)
}

/// Minimise `mean_i −ln p_i[y_i] + l2/2·|θ|²` with `p_i[k] ∝ exp(offset_i[k] + θ·x_i[k])`
/// (a conditional logit: one feature vector per class) by damped Newton steps. Convex, so
/// this finds the optimum; dimensions here are at most 12.
fn fit_conditional_logit_offset(
    x: &[[Vec<f64>; 3]],
    offsets: &[[f64; 3]],
    y: &[usize],
    l2: f64,
    init: Vec<f64>,
) -> Vec<f64> {
    let d = init.len();
    let n = x.len().max(1) as f64;
    let objective = |theta: &[f64]| -> f64 {
        let mut f = 0.5 * l2 * theta.iter().map(|t| t * t).sum::<f64>();
        for ((xi, oi), &yi) in x.iter().zip(offsets).zip(y) {
            let z: [f64; 3] = std::array::from_fn(|k| oi[k] + dot(theta, &xi[k]));
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            f += (lse - z[yi]) / n;
        }
        f
    };
    let mut theta = init;
    let mut f = objective(&theta);
    for _ in 0..100 {
        let mut grad: Vec<f64> = theta.iter().map(|t| l2 * t).collect();
        let mut hess = vec![vec![0.0; d]; d];
        for (i, h) in hess.iter_mut().enumerate() {
            h[i] = l2;
        }
        for ((xi, oi), &yi) in x.iter().zip(offsets).zip(y) {
            let z: [f64; 3] = std::array::from_fn(|k| oi[k] + dot(&theta, &xi[k]));
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: [f64; 3] = std::array::from_fn(|k| (z[k] - m).exp());
            let s: f64 = e.iter().sum();
            let p = e.map(|v| v / s);
            let xbar: Vec<f64> = (0..d).map(|a| (0..3).map(|k| p[k] * xi[k][a]).sum()).collect();
            for a in 0..d {
                grad[a] += (xbar[a] - xi[yi][a]) / n;
                for b in 0..d {
                    let exx: f64 = (0..3).map(|k| p[k] * xi[k][a] * xi[k][b]).sum();
                    hess[a][b] += (exx - xbar[a] * xbar[b]) / n;
                }
            }
        }
        let Some(step) = solve(hess, grad.clone()) else { break };
        // backtracking on the Newton direction
        let mut t = 1.0;
        let mut improved = false;
        while t > 1e-8 {
            let cand: Vec<f64> = theta.iter().zip(&step).map(|(a, s)| a - t * s).collect();
            let fc = objective(&cand);
            if fc <= f {
                improved = fc < f;
                theta = cand;
                f = fc;
                break;
            }
            t *= 0.5;
        }
        let gnorm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        if !improved || gnorm < 1e-10 {
            break;
        }
    }
    theta
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solve `a·x = b` (Gaussian elimination with partial pivoting); `None` if singular.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Option<Vec<f64>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        b.swap(col, piv);
        for row in col + 1..n {
            let (top, bottom) = a.split_at_mut(row);
            let (pivot, target) = (&top[col], &mut bottom[0]);
            let f = target[col] / pivot[col];
            for (x, p) in target[col..].iter_mut().zip(&pivot[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| a[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / a[i][i];
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn row(a: usize, b: usize) -> ArenaRow {
        ArenaRow {
            id: String::new(),
            prompt: vec!["p".into()],
            response_a: vec!["x".repeat(a)],
            response_b: vec!["y".repeat(b)],
            label: None,
        }
    }

    /// Rows whose winner is drawn from a known length-dependent distribution.
    fn synthetic(n: usize, seed: u64) -> Vec<(ArenaRow, usize)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let (a, b) = (rng.random_range(10..2000), rng.random_range(10..2000));
                let d = ((a as f64).ln_1p() - (b as f64).ln_1p()) * 1.5;
                let z = [d, -d, 0.3 - d.abs()];
                let e = z.map(f64::exp);
                let u = rng.random::<f64>() * e.iter().sum::<f64>();
                let y = if u < e[0] { 0 } else if u < e[0] + e[1] { 1 } else { 2 };
                (row(a, b), y)
            })
            .collect()
    }

    fn pairs(v: &[(ArenaRow, usize)]) -> Vec<(&ArenaRow, usize)> {
        v.iter().map(|(r, y)| (r, *y)).collect()
    }

    #[test]
    fn the_length_model_needs_enough_rows_and_does_not_extrapolate() {
        let few = synthetic(MIN_LENGTH_ROWS - 1, 5);
        assert!(LengthModel::fit(&pairs(&few)).is_none());
        let m = LengthModel::fit(&pairs(&synthetic(400, 6))).unwrap();
        // nor are its mixing weights fitted on too few validation rows
        assert!(LengthCalibration::fit(m.clone(), &vec![[0.0f32; 3]; few.len()], &pairs(&few)).is_none());
        // features far past the training range score as the clamp's edge does
        let edge: [f64; 3] = std::array::from_fn(|j| m.mean[j] + MAX_Z * m.scale[j]);
        let far: [f64; 3] = std::array::from_fn(|j| m.mean[j] + 50.0 * m.scale[j]);
        assert_eq!(m.logits(&edge), m.logits(&far));
        let inside: [f64; 3] = std::array::from_fn(|j| m.mean[j] + 0.5 * m.scale[j]);
        assert_ne!(m.logits(&inside), m.logits(&edge));
    }

    #[test]
    fn temperature_flattens_overconfident_logits() {
        let logits = [[4.0f32, 0.0, 0.0], [0.0, 4.0, 0.0], [4.0, 0.0, 0.0], [0.0, 0.0, 4.0]];
        let c = fit_temperature(&logits, &[0, 1, 1, 2]);
        assert!(c.temperature > 1.0 && c.log_loss_after < c.log_loss_before);
    }

    #[test]
    fn a_few_right_answers_do_not_make_the_temperature_collapse() {
        // One row, right with a margin of 3: without the prior T falls to its floor, 0.05.
        let one = fit_temperature(&[[3.0f32, 0.0, 0.0]], &[0]);
        assert!(one.temperature > 0.3 && one.temperature <= 1.0, "{one:?}");
        // Many rows drawn from softmax(z) and scored with 3z: the fit finds T = 3, prior or not.
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let z: [f64; 3] = std::array::from_fn(|_| rng.random_range(-2.0..2.0));
            let e = z.map(f64::exp);
            let u = rng.random::<f64>() * e.iter().sum::<f64>();
            labels.push(if u < e[0] { 0 } else if u < e[0] + e[1] { 1 } else { 2 });
            logits.push(z.map(|v| (3.0 * v) as f32));
        }
        let many = fit_temperature(&logits, &labels);
        assert!((many.temperature - 3.0).abs() < 0.3, "{many:?}");
    }

    #[test]
    fn newton_reaches_a_stationary_point() {
        let data = synthetic(400, 1);
        let m = LengthModel::fit(&pairs(&data)).unwrap();
        // the gradient of the penalised objective vanishes at the fit: check by central
        // differences of the objective along each weight (tolerance 1e-6 on a ~1.0 loss)
        let objective = |m: &LengthModel| {
            let mut f = 0.0;
            for (r, y) in &data {
                let z = m.logits(&length_features(r));
                let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                f += mx + z.iter().map(|v| (v - mx).exp()).sum::<f64>().ln() - z[*y];
            }
            f / data.len() as f64 + 0.5 * LENGTH_L2 * m.weights.iter().flatten().map(|w| w * w).sum::<f64>()
        };
        for j in 0..4 {
            for k in 0..3 {
                let (mut up, mut down) = (m.clone(), m.clone());
                up.weights[j][k] += 1e-4;
                down.weights[j][k] -= 1e-4;
                let g = (objective(&up) - objective(&down)) / 2e-4;
                assert!(g.abs() < 1e-6, "d/dw[{j}][{k}] = {g}");
            }
        }
    }

    #[test]
    fn length_model_beats_the_prior_on_held_out_rows() {
        let train = synthetic(800, 2);
        let test = synthetic(400, 3);
        let m = LengthModel::fit(&pairs(&train)).unwrap();
        let mut prior = [0.0; 3];
        for (_, y) in &train {
            prior[*y] += 1.0 / train.len() as f64;
        }
        let labels: Vec<usize> = test.iter().map(|(_, y)| *y).collect();
        let model_ll = log_loss(test.iter().map(|(r, _)| classifier::softmax3(&m.logits(&length_features(r)).map(|v| v as f32), 1.0)), &labels);
        let prior_ll = log_loss(test.iter().map(|_| prior.map(|p| p as f32)), &labels);
        assert!(model_ll < prior_ll - 0.05, "length model {model_ll:.4} vs prior {prior_ll:.4}");
        // A and B play mirrored roles in the generator, so the learnt weights are near mirrored
        assert!(m.weights[1][0] > 0.3 && m.weights[1][1] < -0.3, "{:?}", m.weights);
    }

    #[test]
    fn stacking_ignores_noise_logits_and_uses_informative_ones() {
        let train = synthetic(800, 4);
        let val = synthetic(300, 5);
        let m = LengthModel::fit(&pairs(&train)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        // pure noise logits, large: the fit turns them (almost) off and keeps the length model
        let noise: Vec<[f32; 3]> = val.iter().map(|_| std::array::from_fn(|_| rng.random_range(-5.0..5.0))).collect();
        let c = LengthCalibration::fit(m.clone(), &noise, &pairs(&val)).unwrap();
        assert!(c.logit_scale < 0.1 && c.length_scale > 0.5, "{c:?}");
        // logits that know the label: the fit leans on them
        let oracle: Vec<[f32; 3]> =
            val.iter().map(|(_, y)| std::array::from_fn(|k| if k == *y { 1.0 } else { 0.0 })).collect();
        let c = LengthCalibration::fit(m, &oracle, &pairs(&val)).unwrap();
        assert!(c.logit_scale > 2.0, "{c:?}");
        assert!(length_log_loss(&c, &oracle, &pairs(&val)) < 0.5);
    }

    #[test]
    fn swapping_a_and_b_mirrors_the_features() {
        let r = row(100, 700);
        assert_eq!(mirrored(length_features(&r)), length_features(&r.swapped()));
    }

    #[test]
    fn without_lengths_the_temperature_divides() {
        let z = calibrated_logits(2.0, None, &[2.0, 4.0, -2.0], &length_features(&row(1, 1)));
        assert_eq!(z, [1.0, 2.0, -1.0]);
    }
}
