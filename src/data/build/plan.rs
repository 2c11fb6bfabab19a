//! Planning bags at a chosen witness rate from pools of normal and abnormal cells: which cell
//! goes into which bag, and which bags are for training and which for testing. Shared by
//! `slam bags` (cells are image files) and `slam synth` (cells are generated).

use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::data::store::BagLabel;

/// What to build: the flags of every command that builds bags (with `slam synth`'s defaults;
/// the seed is each command's own).
#[derive(clap::Args, Clone, Debug, PartialEq, serde::Serialize)]
pub struct BagPlanConfig {
    /// Bags in all, over both splits.
    #[arg(long, default_value_t = 20)]
    pub bags: usize,
    /// Cells per bag.
    #[arg(long, default_value_t = 100)]
    pub bag_size: usize,
    /// Abnormal cells / cells in an abnormal bag; normal bags hold normal cells only.
    #[arg(long, default_value_t = 0.1)]
    pub witness_rate: f64,
    /// Share of the bags that are abnormal.
    #[arg(long, default_value_t = 0.5)]
    pub abnormal_fraction: f64,
    /// Share of each label's bags for training; the rest are for testing.
    #[arg(long = "split", value_name = "FRACTION", default_value_t = 0.5)]
    pub train_fraction: f64,
    /// Seed of the draw (the command's --seed).
    #[arg(skip)]
    pub seed: u64,
}

/// Training or testing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

/// One cell of a planned bag: an index into the normal or the abnormal pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cell {
    pub abnormal: bool,
    pub index: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedBag {
    /// `normal_NNN` or `abnormal_NNN`, the reference's naming.
    pub name: String,
    pub label: BagLabel,
    pub split: Split,
    /// The bag's cells in a shuffled order (witnesses are not at the front).
    pub cells: Vec<Cell>,
}

impl BagPlanConfig {
    /// Abnormal cells in each abnormal bag.
    pub fn witnesses_per_bag(&self) -> usize {
        (self.bag_size as f64 * self.witness_rate).round() as usize
    }

    pub fn abnormal_bags(&self) -> usize {
        (self.bags as f64 * self.abnormal_fraction).round() as usize
    }

    /// Cells the plan takes from each pool: (normal, abnormal).
    pub fn cells_needed(&self) -> (usize, usize) {
        let abnormal_bags = self.abnormal_bags();
        let witnesses = self.witnesses_per_bag();
        let normal = (self.bags - abnormal_bags) * self.bag_size
            + abnormal_bags * (self.bag_size - witnesses);
        (normal, abnormal_bags * witnesses)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.bags >= 1, "at least one bag is needed");
        ensure!(self.bag_size >= 1, "a bag needs at least one cell");
        ensure!(
            self.witness_rate > 0.0 && self.witness_rate <= 1.0,
            "the witness rate must be in (0, 1], got {}",
            self.witness_rate
        );
        ensure!(
            (0.0..=1.0).contains(&self.abnormal_fraction),
            "the abnormal bag fraction must be in [0, 1], got {}",
            self.abnormal_fraction
        );
        ensure!(
            (0.0..=1.0).contains(&self.train_fraction),
            "the train split must be in [0, 1], got {}",
            self.train_fraction
        );
        let witnesses = self.witnesses_per_bag();
        ensure!(
            witnesses >= 1,
            "a witness rate of {} gives {:.2} abnormal cells in a bag of {}: use bigger bags or a higher rate",
            self.witness_rate,
            self.bag_size as f64 * self.witness_rate,
            self.bag_size
        );
        Ok(())
    }
}

/// Plans the bags, drawing each cell at most once from pools of `normal_available` and
/// `abnormal_available` cells; refuses, with the numbers, when the pools are too small.
pub fn plan_bags(
    config: &BagPlanConfig,
    normal_available: usize,
    abnormal_available: usize,
) -> Result<Vec<PlannedBag>> {
    config.validate()?;
    let (normal_needed, abnormal_needed) = config.cells_needed();
    ensure!(
        normal_needed <= normal_available && abnormal_needed <= abnormal_available,
        "{} bags of {} cells at witness rate {} need {normal_needed} normal and {abnormal_needed} abnormal cells; \
         there are {normal_available} normal and {abnormal_available} abnormal",
        config.bags,
        config.bag_size,
        config.witness_rate
    );
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut normal: Vec<usize> = (0..normal_available).collect();
    let mut abnormal: Vec<usize> = (0..abnormal_available).collect();
    normal.shuffle(&mut rng);
    abnormal.shuffle(&mut rng);
    let (mut normal, mut abnormal) = (normal.into_iter(), abnormal.into_iter());

    let abnormal_bags = config.abnormal_bags();
    let witnesses = config.witnesses_per_bag();
    let labels = [
        (BagLabel::Abnormal, abnormal_bags),
        (BagLabel::Normal, config.bags - abnormal_bags),
    ];
    let mut bags = Vec::with_capacity(config.bags);
    for (label, count) in labels {
        let train = (count as f64 * config.train_fraction).round() as usize;
        for i in 0..count {
            let abnormal_cells = if label.is_abnormal() { witnesses } else { 0 };
            let mut cells: Vec<Cell> = (abnormal.by_ref().take(abnormal_cells))
                .map(|index| Cell {
                    abnormal: true,
                    index,
                })
                .chain(
                    (normal.by_ref().take(config.bag_size - abnormal_cells)).map(|index| Cell {
                        abnormal: false,
                        index,
                    }),
                )
                .collect();
            cells.shuffle(&mut rng);
            bags.push(PlannedBag {
                name: format!("{label}_{i:03}"),
                label,
                split: if i < train { Split::Train } else { Split::Test },
                cells,
            });
        }
    }
    Ok(bags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn config() -> BagPlanConfig {
        BagPlanConfig {
            bags: 10,
            bag_size: 200,
            witness_rate: 0.01,
            abnormal_fraction: 0.5,
            train_fraction: 0.6,
            seed: 7,
        }
    }

    #[test]
    fn exact_witness_rate_and_no_cell_reused() {
        let bags = plan_bags(&config(), 2000, 10).unwrap();
        assert_eq!(bags.len(), 10);
        let mut seen = HashSet::new();
        for bag in &bags {
            assert_eq!(bag.cells.len(), 200);
            let witnesses = bag.cells.iter().filter(|c| c.abnormal).count();
            assert_eq!(
                witnesses,
                if bag.label.is_abnormal() { 2 } else { 0 },
                "{}",
                bag.name
            );
            for cell in &bag.cells {
                assert!(seen.insert(*cell), "{cell:?} used twice");
            }
        }
        let train = |label| {
            bags.iter()
                .filter(|b| b.label == label && b.split == Split::Train)
                .count()
        };
        assert_eq!((train(BagLabel::Abnormal), train(BagLabel::Normal)), (3, 3));
    }

    #[test]
    fn seeded() {
        assert_eq!(
            plan_bags(&config(), 2000, 10).unwrap(),
            plan_bags(&config(), 2000, 10).unwrap()
        );
        let other = BagPlanConfig {
            seed: 8,
            ..config()
        };
        assert_ne!(
            plan_bags(&config(), 2000, 10).unwrap(),
            plan_bags(&other, 2000, 10).unwrap()
        );
    }

    #[test]
    fn refuses_small_pools_with_the_numbers() {
        let err = plan_bags(&config(), 2000, 9).unwrap_err().to_string();
        assert!(err.contains("need 1990 normal and 10 abnormal"), "{err}");
        assert!(
            err.contains("there are 2000 normal and 9 abnormal"),
            "{err}"
        );
        let low = BagPlanConfig {
            witness_rate: 0.001,
            ..config()
        };
        assert!(
            plan_bags(&low, 5000, 100)
                .unwrap_err()
                .to_string()
                .contains("witness rate")
        );
    }
}
