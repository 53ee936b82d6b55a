//! Class balance: desirable and undesirable counts, the loss-weight range of the KTO paper (eq. 8), and
//! `desirable_weight = "auto"`.
//!
//! Eq. 8 of the KTO paper asks for `λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]`. TRL (end of `_prepare_dataset`) computes, with
//! `n_D = max(#desirable, 1)` and `n_U = max(#samples - n_D, 1)` and Python's `round(x, 2)`:
//! desirable_weight in `[round(n_U·λ_U/n_D, 2), round(n_U·λ_U/n_D·1.33, 2)]` or
//! undesirable_weight in `[round(n_D·λ_D/n_U/1.33, 2), round(n_D·λ_D/n_U, 2)]`, and warns when the counts differ and
//! neither weight is in its range.
//!
//! `desirable_weight = "auto"` resolves to the middle of eq. 8's interval: `n_U·λ_U/n_D · 7/6`. The middle, rather
//! than the lower end (weighted classes exactly balanced), stays inside TRL's rounded range whatever the rounding,
//! so TRL would not warn about it.
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
    Some(WeightRanges {
        desirable: (
            round2((n_u * undesirable_weight / n_d) * 1.0),
            round2((n_u * undesirable_weight / n_d) * 1.33),
        ),
        undesirable: (
            round2((n_d * desirable_weight / n_u) / 1.33),
            round2((n_d * desirable_weight / n_u) / 1.0),
        ),
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

/// The value of `desirable_weight = "auto"`: the middle of eq. 8's interval.
pub fn auto_desirable_weight(counts: ClassCounts, undesirable_weight: f64) -> f64 {
    let (n_d, n_u) = counts.trl_counts();
    n_u * undesirable_weight / n_d * (1.0 + 4.0 / 3.0) / 2.0
}

/// The config's `desirable_weight`: a number, or `"auto"` (see [`auto_desirable_weight`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DesirableWeight {
    Value(f64),
    Auto,
}

impl Default for DesirableWeight {
    fn default() -> Self {
        DesirableWeight::Value(1.0)
    }
}

impl DesirableWeight {
    /// The weight to train with, given the training set's counts.
    pub fn resolve(self, counts: ClassCounts, undesirable_weight: f64) -> f64 {
        match self {
            DesirableWeight::Value(weight) => weight,
            DesirableWeight::Auto => auto_desirable_weight(counts, undesirable_weight),
        }
    }
}

impl fmt::Display for DesirableWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DesirableWeight::Value(weight) => write!(f, "{weight}"),
            DesirableWeight::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for DesirableWeight {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "auto" {
            return Ok(DesirableWeight::Auto);
        }
        match text.parse::<f64>() {
            Ok(weight) if weight.is_finite() && weight >= 0.0 => Ok(DesirableWeight::Value(weight)),
            _ => Err(format!(
                "desirable_weight must be a non-negative number or \"auto\", got {text:?}"
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for DesirableWeight {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(weight) => weight.to_string().parse(),
            Raw::Text(text) => text.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DesirableWeight {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DesirableWeight::Value(weight) => serializer.serialize_f64(*weight),
            DesirableWeight::Auto => serializer.serialize_str("auto"),
        }
    }
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
    fn desirable_weight_setting() {
        let weight: DesirableWeight = serde_json::from_str("1.5").unwrap();
        assert_eq!(weight, DesirableWeight::Value(1.5));
        let weight: DesirableWeight = serde_json::from_str("\"auto\"").unwrap();
        let counts = ClassCounts {
            desirable: 10,
            undesirable: 5,
        };
        assert!((weight.resolve(counts, 1.0) - 0.5 * 7.0 / 6.0).abs() < 1e-12);
        assert_eq!(DesirableWeight::Value(2.0).resolve(counts, 1.0), 2.0);
        let error = serde_json::from_str::<DesirableWeight>("\"half\"")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains(
                "desirable_weight must be a non-negative number or \"auto\", got \"half\""
            ),
            "{error}"
        );
        assert!(serde_json::from_str::<DesirableWeight>("-1").is_err());
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
            assert!((ratio - 7.0 / 6.0).abs() < 1e-12);
        }
    }
}
