//! Class balance: desirable and undesirable counts, the loss-weight range of the KTO paper (eq. 8), and
//! `desirable_weight = "auto"`.
//!
//! Eq. 8 of the KTO paper asks for `λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]`. TRL (end of `_prepare_dataset`) computes, with
//! `n_D = max(#desirable, 1)` and `n_U = max(#samples - n_D, 1)` and Python's `round(x, 2)`:
//! desirable_weight in `[round(n_U·λ_U/n_D, 2), round(n_U·λ_U/n_D·1.33, 2)]` or
//! undesirable_weight in `[round(n_D·λ_D/n_U/1.33, 2), round(n_D·λ_D/n_U, 2)]`, and warns when the counts differ and
//! neither weight is in its range.
//!
//! `desirable_weight = "auto"` resolves to the middle of TRL's interval: `n_U·λ_U/n_D · (1 + 1.33)/2`, and
//! `undesirable_weight = "auto"` to the middle of its own: `n_D·λ_D/n_U · (1/1.33 + 1)/2`. The middle, rather than
//! an end (weighted classes exactly balanced), stays inside TRL's rounded range, so TRL would not warn about it.
use std::fmt;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassCounts {
    pub desirable: usize,
    pub undesirable: usize,
}

impl ClassCounts {
    pub fn from_labels(labels: impl IntoIterator<Item = bool>) -> Self {
        let mut counts = Self::default();
        for label in labels {
            if label {
                counts.desirable += 1;
            } else {
                counts.undesirable += 1;
            }
        }
        counts
    }

    pub fn total(&self) -> usize {
        self.desirable + self.undesirable
    }

    /// A warning when one class is missing: KTO then only pushes rewards one way (and reward accuracy is
    /// meaningless).
    pub fn single_class_warning(&self) -> Option<String> {
        match (self.desirable, self.undesirable) {
            (0, 0) => None,
            (0, n) => Some(format!(
                "the data has only undesirable samples ({n}) and no desirable one: KTO can only push rewards down"
            )),
            (n, 0) => Some(format!(
                "the data has only desirable samples ({n}) and no undesirable one: KTO can only push rewards up"
            )),
            _ => None,
        }
    }

    /// The counts TRL uses for eq. 8.
    fn trl_counts(&self) -> (f64, f64) {
        let desirable = self.desirable.max(1);
        let undesirable = (self.total().saturating_sub(desirable)).max(1);
        (desirable as f64, undesirable as f64)
    }
}

impl fmt::Display for ClassCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} desirable, {} undesirable",
            self.desirable, self.undesirable
        )
    }
}

/// TRL's recommended ranges: set EITHER weight inside its range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightRanges {
    pub desirable: (f64, f64),
    pub undesirable: (f64, f64),
}

impl WeightRanges {
    pub fn contains(&self, desirable_weight: f64, undesirable_weight: f64) -> bool {
        let inside = |(low, high): (f64, f64), w: f64| low <= w && w <= high;
        inside(self.desirable, desirable_weight) || inside(self.undesirable, undesirable_weight)
    }
}

/// The upper end of eq. 8's interval as TRL writes it: `λ_D·n_D / (λ_U·n_U) ∈ [1, 1.33]` (the paper's 4/3).
const EQ8_UPPER: f64 = 1.33;

/// Eq. 8's intervals before TRL rounds them: for the desirable weight given the undesirable one, and the reverse.
fn eq8_intervals(
    counts: ClassCounts,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> WeightRanges {
    let (n_d, n_u) = counts.trl_counts();
    let desirable = n_u * undesirable_weight / n_d;
    let undesirable = n_d * desirable_weight / n_u;
    WeightRanges {
        desirable: (desirable, desirable * EQ8_UPPER),
        undesirable: (undesirable / EQ8_UPPER, undesirable),
    }
}

/// The ranges exactly as TRL computes them; `None` when TRL skips the check (equal counts).
pub fn recommended_ranges(
    counts: ClassCounts,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Option<WeightRanges> {
    let (n_d, n_u) = counts.trl_counts();
    if n_d == n_u {
        return None;
    }
    let exact = eq8_intervals(counts, desirable_weight, undesirable_weight);
    let round = |(low, high): (f64, f64)| (round2(low), round2(high));
    Some(WeightRanges {
        desirable: round(exact.desirable),
        undesirable: round(exact.undesirable),
    })
}

/// TRL's warning, word for word, when the weights are outside the recommended ranges.
pub fn balance_warning(
    counts: ClassCounts,
    desirable_weight: f64,
    undesirable_weight: f64,
) -> Option<String> {
    let ranges = recommended_ranges(counts, desirable_weight, undesirable_weight)?;
    if ranges.contains(desirable_weight, undesirable_weight) {
        return None;
    }
    Some(format!(
        "You have different amounts of desirable/positive and undesirable/negative examples but the weights on the \
         desirable and undesirable losses don't seem to be in an ideal range. Based on your data, we recommend EITHER \
         desirable_weight in [{}, {}] or undesirable_weight in [{}, {}] (but NOT BOTH). See the documentation on how \
         to optimally set these weights.",
        python_float(ranges.desirable.0),
        python_float(ranges.desirable.1),
        python_float(ranges.undesirable.0),
        python_float(ranges.undesirable.1),
    ))
}

/// The value of `desirable_weight = "auto"`: the middle of eq. 8's interval for it.
pub fn auto_desirable_weight(counts: ClassCounts, undesirable_weight: f64) -> f64 {
    middle(eq8_intervals(counts, 0.0, undesirable_weight).desirable)
}

/// The value of `undesirable_weight = "auto"`: the middle of eq. 8's interval for it.
pub fn auto_undesirable_weight(counts: ClassCounts, desirable_weight: f64) -> f64 {
    middle(eq8_intervals(counts, desirable_weight, 0.0).undesirable)
}

fn middle((low, high): (f64, f64)) -> f64 {
    (low + high) / 2.0
}

/// Python's `round(x, 2)`: the double nearest to x rounded half-to-even on its exact decimal value, which is what
/// Rust's `{:.2}` formatting computes.
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().expect("a formatted float parses")
}

/// Python's `str(float)` for values with at most two decimals (`1.0`, `1.33`).
fn python_float(x: f64) -> String {
    let text = format!("{x}");
    if text.contains(['.', 'e', 'i', 'N']) {
        text
    } else {
        format!("{text}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let counts = ClassCounts::from_labels([true, false, true, true]);
        assert_eq!(
            counts,
            ClassCounts {
                desirable: 3,
                undesirable: 1
            }
        );
        assert_eq!(counts.single_class_warning(), None);
        let only = ClassCounts::from_labels([true, true])
            .single_class_warning()
            .unwrap();
        assert!(only.contains("only desirable samples (2)"), "{only}");
        let only = ClassCounts::from_labels([false])
            .single_class_warning()
            .unwrap();
        assert!(only.contains("only undesirable samples (1)"), "{only}");
    }

    #[test]
    fn ranges_as_trl_computes_them() {
        // 7 desirable, 5 undesirable, weights 1.0/1.0: TRL recommends desirable_weight in [0.71, 0.95] or
        // undesirable_weight in [1.05, 1.4].
        let counts = ClassCounts {
            desirable: 7,
            undesirable: 5,
        };
        let ranges = recommended_ranges(counts, 1.0, 1.0).unwrap();
        assert_eq!(ranges.desirable, (0.71, 0.95));
        assert_eq!(ranges.undesirable, (1.05, 1.4));
        let warning = balance_warning(counts, 1.0, 1.0).unwrap();
        assert!(
            warning
                .contains("desirable_weight in [0.71, 0.95] or undesirable_weight in [1.05, 1.4]"),
            "{warning}"
        );
        assert_eq!(balance_warning(counts, 0.8, 1.0), None);
        assert_eq!(balance_warning(counts, 1.0, 1.2), None);
        // Equal counts: TRL does not check.
        assert_eq!(
            recommended_ranges(
                ClassCounts {
                    desirable: 4,
                    undesirable: 4
                },
                1.0,
                9.0
            ),
            None
        );
        // One class: TRL clamps the counts to at least 1, taking the 1 from the other class.
        let ranges = recommended_ranges(
            ClassCounts {
                desirable: 0,
                undesirable: 5,
            },
            1.0,
            1.0,
        )
        .unwrap();
        assert_eq!(ranges.desirable, (4.0, 5.32));
        assert!(balance_warning(
            ClassCounts {
                desirable: 0,
                undesirable: 5
            },
            1.0,
            1.0
        )
        .unwrap()
        .contains("[4.0, 5.32]"));
    }

    #[test]
    fn rounding_is_pythons() {
        assert_eq!(round2(2.675), 2.67); // 2.675 is 2.67499999... in binary
        assert_eq!(round2(0.125), 0.12); // an exact tie rounds to even
        assert_eq!(round2(0.375), 0.38);
        assert_eq!(round2(1.0 / 3.0), 0.33);
    }

    #[test]
    fn auto_weight_is_inside_trls_range() {
        for (desirable, undesirable, undesirable_weight) in
            [(7, 5, 1.0), (100, 3, 1.0), (3, 100, 1.5), (10, 10, 1.0)]
        {
            let counts = ClassCounts {
                desirable,
                undesirable,
            };
            let auto = auto_desirable_weight(counts, undesirable_weight);
            assert_eq!(
                balance_warning(counts, auto, undesirable_weight),
                None,
                "{counts} → {auto}"
            );
            let ratio = auto * desirable as f64 / (undesirable_weight * undesirable as f64);
            assert!((ratio - (1.0 + 1.33) / 2.0).abs() < 1e-12);
            let desirable_weight = 1.2;
            let auto = auto_undesirable_weight(counts, desirable_weight);
            assert_eq!(
                balance_warning(counts, desirable_weight, auto),
                None,
                "{counts} → undesirable {auto}"
            );
            let ratio = desirable_weight * desirable as f64 / (auto * undesirable as f64);
            assert!((1.0..=1.33).contains(&ratio), "{ratio}");
        }
    }
}
