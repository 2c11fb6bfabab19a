//! Which files are slides, and their bag names and labels: the inputs searched for slide
//! images by extension, each named by its file stem and labelled from a labels file, its
//! folders or its file name.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow, bail, ensure};

use crate::data::build::pack::{find_files, prefix_label, quoted_list, read_labels};
use crate::data::store::BagLabel;

pub(super) const TIFF_EXTENSIONS: [&str; 4] = ["tif", "tiff", "btf", "tf8"];
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
/// Vendor formats OpenSlide reads that are not plain TIFF.
pub const OPENSLIDE_EXTENSIONS: [&str; 8] =
    ["svs", "ndpi", "mrxs", "vms", "vmu", "scn", "bif", "svslide"];

/// A slide to tile: its file, bag name (the file stem) and label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlideFile {
    pub path: PathBuf,
    pub name: String,
    pub label: BagLabel,
}

/// The slides of the inputs.
#[derive(Clone, Debug)]
pub struct FoundSlides {
    /// In the order of the inputs; in natural order of their paths within a folder.
    pub slides: Vec<SlideFile>,
    /// Files in the folders that are not slide images (by extension), or hidden.
    pub ignored: usize,
    /// Rows of the labels file naming no slide.
    pub unused_labels: usize,
}

/// Finds the slides of `inputs` (slide files, or folders searched at any depth) and labels
/// them: from `labels` (CSV `slide,label`, by file stem or name) when given, else from the
/// nearest folder named normal/abnormal (or negative/positive), else from the file name
/// prefix normal_/abnormal_.
pub fn find_slides(inputs: &[PathBuf], labels: Option<&Path>) -> Result<FoundSlides> {
    ensure!(!inputs.is_empty(), "no slides given");
    let mut files: Vec<(PathBuf, Option<BagLabel>)> = Vec::new();
    let mut ignored = 0;
    for input in inputs {
        if input.is_dir() {
            let (found, others) = find_files(input, input, is_slide_name)?;
            ignored += others;
            files.extend(found.into_iter().map(|f| {
                let label = layout_label(Path::new(&f.name));
                (f.path, label)
            }));
        } else {
            ensure!(input.exists(), "{} does not exist", input.display());
            // Only the slide's own folder counts: folders further up say nothing of it.
            let own = input.iter().rev().take(2).collect::<Vec<_>>();
            let own: PathBuf = own.into_iter().rev().collect();
            files.push((input.clone(), layout_label(&own)));
        }
    }
    let shown: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    ensure!(
        !files.is_empty(),
        "no slide images in {} (TIFF, PNG, JPEG or the OpenSlide formats {})",
        shown.join(", "),
        OPENSLIDE_EXTENSIONS.join(", ")
    );

    let mut by_name: HashMap<String, &Path> = HashMap::new();
    for (path, _) in &files {
        let name = stem(path)?;
        if let Some(before) = by_name.insert(name.clone(), path) {
            bail!(
                "slides {} and {} would both be bag {name:?}: bag names (file stems) must be unique",
                before.display(),
                path.display()
            );
        }
    }

    let mut slides = Vec::with_capacity(files.len());
    let mut unlabelled = Vec::new();
    let mut unused_labels = 0;
    match labels {
        Some(csv) => {
            let table = read_labels(csv, "slide")?;
            let mut used = HashSet::new();
            for (path, _) in &files {
                let name = stem(path)?;
                let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                let key = [Some(name.clone()), file_name]
                    .into_iter()
                    .flatten()
                    .find(|k| table.contains_key(k));
                match key {
                    Some(key) => {
                        slides.push(SlideFile {
                            path: path.clone(),
                            name,
                            label: table[&key],
                        });
                        used.insert(key);
                    }
                    None => unlabelled.push(path.display().to_string()),
                }
            }
            ensure!(
                unlabelled.is_empty(),
                "{} has no row for slide(s) {}; every slide needs a label",
                csv.display(),
                quoted_list(&unlabelled.iter().collect::<Vec<_>>())
            );
            unused_labels = table.len() - used.len();
        }
        None => {
            for (path, label) in files {
                match label {
                    Some(label) => slides.push(SlideFile {
                        name: stem(&path)?,
                        path,
                        label,
                    }),
                    None => unlabelled.push(path.display().to_string()),
                }
            }
            ensure!(
                unlabelled.is_empty(),
                "cannot tell the label of slide(s) {}: put them in folders normal/ and abnormal/, name them normal_*/abnormal_*, or label them with --labels slides.csv (header slide,label)",
                quoted_list(&unlabelled.iter().collect::<Vec<_>>())
            );
        }
    }
    Ok(FoundSlides {
        slides,
        ignored,
        unused_labels,
    })
}

fn is_slide_name(path: &Path) -> bool {
    let ext = extension(path);
    TIFF_EXTENSIONS
        .iter()
        .chain(&IMAGE_EXTENSIONS)
        .chain(&OPENSLIDE_EXTENSIONS)
        .any(|e| *e == ext)
}

pub(super) fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn stem(path: &Path) -> Result<String> {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))
}

/// The label the layout gives a slide: its nearest folder named for a label, else its name.
fn layout_label(path: &Path) -> Option<BagLabel> {
    let folders = path.parent().into_iter().flat_map(|p| p.components().rev());
    let by_folder = folders
        .filter_map(
            |c| match c.as_os_str().to_string_lossy().to_lowercase().as_str() {
                "normal" | "negative" => Some(BagLabel::Normal),
                "abnormal" | "positive" => Some(BagLabel::Abnormal),
                _ => None,
            },
        )
        .next();
    by_folder.or_else(|| prefix_label(&path.file_name()?.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_the_layout() {
        assert_eq!(
            layout_label(Path::new("a/Abnormal/x/s.tif")),
            Some(BagLabel::Abnormal)
        );
        assert_eq!(
            layout_label(Path::new("normal/abnormal_s.tif")),
            Some(BagLabel::Normal)
        );
        assert_eq!(
            layout_label(Path::new("abnormal_s.tif")),
            Some(BagLabel::Abnormal)
        );
        assert_eq!(layout_label(Path::new("slides/s.tif")), None);
    }
}
