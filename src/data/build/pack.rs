//! Image folders to a patch store (`slam pack`), and the image side shared with `slam bags`:
//! finding PNG/JPEG files in natural order, decoding them in parallel while writing in order,
//! center-cropping to the patch size, and skipping or stopping on unreadable files.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};
use image::ImageReader;
use rayon::prelude::*;

use crate::data::store::{BagLabel, PatchSize, StoreSummary, StoreWriter};

/// Folder nesting followed at most: bounds the walk when symbolic links form a loop.
const MAX_DEPTH: usize = 32;
/// Bag-name prefixes of the bag-folder layout, as in the reference code.
const NORMAL_PREFIX: &str = "normal_";
const ABNORMAL_PREFIX: &str = "abnormal_";

/// How images become patches; shared by `slam pack` and `slam bags`.
#[derive(Clone, Debug, Default)]
pub struct ImageOptions {
    /// Patch size; `None` takes the size of the first image.
    pub patch_size: Option<PatchSize>,
    /// Reject images of another size instead of center-cropping the larger ones.
    pub exact_size: bool,
    /// Skip unreadable, corrupt or too small images (each is reported) instead of stopping.
    pub skip_bad: bool,
    /// Replace output files that exist.
    pub overwrite: bool,
}

/// An image file found under a root folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageFile {
    pub path: PathBuf,
    /// The path relative to the root with `/` separators: the patch's source name.
    pub name: String,
}

/// An image left out under [`ImageOptions::skip_bad`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedImage {
    pub path: PathBuf,
    pub reason: String,
}

/// What a run did with the files it met, besides writing patches.
#[derive(Clone, Debug, Default)]
pub struct ImageTally {
    /// Files that are not PNG or JPEG (by extension), or hidden.
    pub ignored: usize,
    /// Images larger than the patch size, center-cropped.
    pub cropped: usize,
    pub skipped: Vec<SkippedImage>,
}

impl ImageTally {
    /// Records a bad image when skipping, or returns the error that stops the run.
    pub(crate) fn reject(&mut self, path: &Path, err: anyhow::Error, skip: bool) -> Result<()> {
        if !skip {
            return Err(err.context(format!(
                "cannot use image {} (--skip-bad skips such files)",
                path.display()
            )));
        }
        self.skipped.push(SkippedImage {
            path: path.to_path_buf(),
            reason: format!("{err:#}"),
        });
        Ok(())
    }
}

/// The PNG and JPEG files under `dir`, at any depth, in natural order of their names
/// (relative to `root`), and how many other files there were. Hidden files count as ignored;
/// hidden folders are not entered.
pub fn find_images(root: &Path, dir: &Path) -> Result<(Vec<ImageFile>, usize)> {
    find_files(root, dir, is_image_name)
}

/// The files under `dir` whose path `wanted` accepts, as [`find_images`] finds images.
pub(crate) fn find_files(
    root: &Path,
    dir: &Path,
    wanted: fn(&Path) -> bool,
) -> Result<(Vec<ImageFile>, usize)> {
    let (mut images, mut ignored) = (Vec::new(), 0);
    walk(root, dir, 0, wanted, &mut images, &mut ignored)?;
    images.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    Ok((images, ignored))
}

fn walk(
    root: &Path,
    dir: &Path,
    depth: usize,
    wanted: fn(&Path) -> bool,
    images: &mut Vec<ImageFile>,
    ignored: &mut usize,
) -> Result<()> {
    ensure!(
        depth <= MAX_DEPTH,
        "{} is nested more than {MAX_DEPTH} folders deep (a symbolic link loop?)",
        dir.display()
    );
    let entries =
        fs::read_dir(dir).with_context(|| format!("cannot read folder {}", dir.display()))?;
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read folder {}", dir.display()))?
            .path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        // Follows symbolic links; a broken one counts as a file, so an image name that cannot
        // be read is reported by the decoding like any other unreadable image.
        if path.is_dir() {
            if !hidden {
                walk(root, &path, depth + 1, wanted, images, ignored)?;
            }
        } else if !hidden && wanted(&path) {
            images.push(ImageFile {
                name: relative_name(root, &path),
                path,
            });
        } else {
            *ignored += 1;
        }
    }
    Ok(())
}

fn is_image_name(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["png", "jpg", "jpeg"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

fn relative_name(root: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<_> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect();
    parts.join("/")
}

/// Natural order: runs of digits compare as numbers, so `img2` comes before `img10`.
/// Names equal as numbers (`01`, `1`) fall back to plain order, so the order is total.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(c), Some(d)) if c.is_ascii_digit() && d.is_ascii_digit() => {
                let (m, rest_x) = split_number(x);
                let (n, rest_y) = split_number(y);
                let order = m.len().cmp(&n.len()).then_with(|| m.cmp(n));
                if order.is_ne() {
                    return order;
                }
                (x, y) = (rest_x, rest_y);
            }
            (Some(c), Some(d)) => {
                if c != d {
                    return c.cmp(d);
                }
                (x, y) = (&x[1..], &y[1..]);
            }
        }
    }
}

/// Splits off the leading digits, without their leading zeros, and the rest.
fn split_number(s: &[u8]) -> (&[u8], &[u8]) {
    let end = s
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(s.len());
    let zeros = s[..end].iter().take_while(|&&b| b == b'0').count();
    (&s[zeros..end], &s[end..])
}

/// One decoded patch.
pub(crate) struct Patch {
    pub pixels: Vec<u8>,
    /// The image was larger than the patch and center-cropped.
    pub cropped: bool,
}

/// Turns image files into RGB patches of one size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PatchDecoder {
    pub size: PatchSize,
    pub exact: bool,
}

impl PatchDecoder {
    /// Decodes an image (any pixel format, converted to 8-bit RGB; alpha is dropped) and
    /// center-crops it to the patch size. Errors do not name the file; callers add it.
    pub fn decode(&self, path: &Path) -> Result<Patch> {
        let image = open_image(path)?.into_rgb8();
        let found = PatchSize {
            height: image.height() as usize,
            width: image.width() as usize,
        };
        let size = self.size;
        if found == size {
            return Ok(Patch {
                pixels: image.into_raw(),
                cropped: false,
            });
        }
        ensure!(
            !self.exact,
            "it is {found} pixels, not {size} (exact size required)"
        );
        ensure!(
            found.height >= size.height && found.width >= size.width,
            "it is {found} pixels, smaller than the {size} patches"
        );
        let (top, left) = (
            crop_offset(found.height, size.height),
            crop_offset(found.width, size.width),
        );
        let raw = image.as_raw();
        let mut pixels = Vec::with_capacity(size.bytes());
        for y in top..top + size.height {
            let start = (y * found.width + left) * 3;
            pixels.extend_from_slice(&raw[start..start + size.width * 3]);
        }
        Ok(Patch {
            pixels,
            cropped: true,
        })
    }
}

/// Offset of a centered crop, rounded half to even as torchvision's CenterCrop does
/// (`int(round((from - to) / 2.0))`).
fn crop_offset(from: usize, to: usize) -> usize {
    ((from - to) as f64 / 2.0).round_ties_even() as usize
}

pub(crate) fn open_image(path: &Path) -> Result<image::DynamicImage> {
    // The content decides the format when it is recognizable, so a PNG named .jpg still reads.
    let reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .context("cannot open it")?;
    reader.decode().context("cannot decode it")
}

/// The requested patch size, or that of the first image whose header reads. An unreadable
/// image before it is not reported here: the decoding meets it first and reports it.
pub(crate) fn resolve_patch_size<'a>(
    requested: Option<PatchSize>,
    mut images: impl Iterator<Item = &'a ImageFile>,
) -> Result<PatchSize> {
    if let Some(size) = requested {
        return Ok(size);
    }
    images
        .find_map(|file| {
            let (width, height) = ImageReader::open(&file.path)
                .ok()?
                .with_guessed_format()
                .ok()?
                .into_dimensions()
                .ok()?;
            Some(PatchSize {
                height: height as usize,
                width: width as usize,
            })
        })
        .ok_or_else(|| anyhow!("none of the images can be read"))
}

/// Decodes `files` in parallel a chunk at a time and hands each result to `sink` in the
/// order of `files` (with its index), so stores are written deterministically while every
/// core decodes. `progress` gets (images done, images in all) after each chunk.
pub(crate) fn decode_in_order(
    files: &[&ImageFile],
    decoder: PatchDecoder,
    progress: &mut dyn FnMut(usize, usize),
    mut sink: impl FnMut(usize, Result<Patch>) -> Result<()>,
) -> Result<()> {
    // Enough images per chunk to keep every thread busy, few enough to bound the memory.
    let chunk = rayon::current_num_threads() * 16;
    for (c, files_chunk) in files.chunks(chunk).enumerate() {
        let patches: Vec<Result<Patch>> = files_chunk
            .par_iter()
            .map(|file| decoder.decode(&file.path))
            .collect();
        for (i, patch) in patches.into_iter().enumerate() {
            sink(c * chunk + i, patch)?;
        }
        progress(c * chunk + files_chunk.len(), files.len());
    }
    Ok(())
}

/// Refuses to replace `path` unless asked to.
pub(crate) fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    ensure!(
        overwrite || !path.exists(),
        "{} exists; pass --force to replace it",
        path.display()
    );
    Ok(())
}

/// How the bags lie in the input folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Each subfolder is a bag, labelled by its name prefix or a labels file.
    Bags,
    /// The reference's layout: `positive/` and `negative/`, one bag each.
    Pooled,
}

impl FromStr for Layout {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bags" => Ok(Layout::Bags),
            "pooled" => Ok(Layout::Pooled),
            _ => bail!("unknown layout {s:?}; the layouts are bags and pooled"),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Layout::Bags => "bag folders",
            Layout::Pooled => "pooled positive/negative",
        })
    }
}

/// What `slam pack` does.
#[derive(Clone, Debug, Default)]
pub struct PackOptions {
    /// `None` detects the layout.
    pub layout: Option<Layout>,
    /// A CSV file with header `bag,label` labelling bag folders of any name.
    pub labels: Option<PathBuf>,
    pub images: ImageOptions,
}

/// What a pack wrote and met.
#[derive(Clone, Debug)]
pub struct PackReport {
    pub layout: Layout,
    pub summary: StoreSummary,
    pub tally: ImageTally,
    /// Rows of the labels file naming no folder of the input.
    pub unused_labels: usize,
    pub seconds: f64,
}

/// A bag to pack: its folder's images.
struct FolderBag {
    name: String,
    label: BagLabel,
    images: Vec<ImageFile>,
}

/// Packs the images under `input` into a store at `output`; see [`Layout`] for the folder
/// layouts. Nothing appears at `output` unless the whole pack succeeds.
pub fn pack_folder(
    input: &Path,
    output: &Path,
    options: &PackOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PackReport> {
    let start = Instant::now();
    check_output(output, options.images.overwrite)?;
    let mut tally = ImageTally::default();
    let LabelledFolders {
        layout,
        bags: labelled,
        unused_labels,
    } = label_bags(input, options)?;
    let mut bags = Vec::with_capacity(labelled.len());
    for (name, label) in labelled {
        let (images, ignored) = find_images(input, &input.join(&name))?;
        ensure!(
            !images.is_empty(),
            "bag folder {} holds no PNG or JPEG images",
            input.join(&name).display()
        );
        tally.ignored += ignored;
        bags.push(FolderBag {
            name,
            label,
            images,
        });
    }
    let files: Vec<&ImageFile> = bags.iter().flat_map(|b| &b.images).collect();
    let bag_of: Vec<usize> = (bags.iter().enumerate())
        .flat_map(|(b, bag)| std::iter::repeat_n(b, bag.images.len()))
        .collect();
    let size = resolve_patch_size(options.images.patch_size, files.iter().copied())?;
    let decoder = PatchDecoder {
        size,
        exact: options.images.exact_size,
    };
    let mut writer = StoreWriter::create(output, size)?;
    // Bags begin at their first readable image, so a bag whose every image was skipped
    // is caught below instead of being written empty.
    let mut written = vec![0usize; bags.len()];
    let mut current = None;
    decode_in_order(&files, decoder, progress, |i, patch| {
        let bag = bag_of[i];
        match patch {
            Ok(patch) => {
                if current != Some(bag) {
                    writer.begin_bag(&bags[bag].name, bags[bag].label)?;
                    current = Some(bag);
                }
                written[bag] += 1;
                tally.cropped += patch.cropped as usize;
                writer.push_patch(&patch.pixels, None, &files[i].name)
            }
            Err(err) => tally.reject(&files[i].path, err, options.images.skip_bad),
        }
    })?;
    if let Some(empty) = written.iter().position(|&n| n == 0) {
        let first = &bags[empty].images[0];
        let reason = tally.skipped.iter().find(|s| s.path == first.path);
        bail!(
            "every image of bag {:?} was skipped ({}: {}); a bag needs at least one patch",
            bags[empty].name,
            first.name,
            reason.map_or("", |s| s.reason.as_str())
        );
    }
    Ok(PackReport {
        layout,
        summary: writer.finish()?,
        tally,
        unused_labels,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The bag folders of an input with their labels.
struct LabelledFolders {
    layout: Layout,
    /// Folder names and labels, in natural order of the names.
    bags: Vec<(String, BagLabel)>,
    /// Rows of the labels file naming no folder.
    unused_labels: usize,
}

fn label_bags(input: &Path, options: &PackOptions) -> Result<LabelledFolders> {
    let folders = subfolders(input)?;
    ensure!(
        !folders.is_empty(),
        "{} has no subfolders; expected one folder per bag (normal_*/abnormal_*) or the pooled layout positive/ and negative/",
        input.display()
    );
    let layout = match (options.layout, &options.labels) {
        (Some(Layout::Pooled), Some(_)) => {
            bail!(
                "a labels file labels bag folders; the pooled layout takes its labels from positive/ and negative/"
            )
        }
        (Some(layout), _) => layout,
        (None, Some(_)) => Layout::Bags,
        (None, None) if folders.iter().any(|f| f == "positive" || f == "negative") => {
            Layout::Pooled
        }
        (None, None) => {
            let unnamed: Vec<&String> = folders
                .iter()
                .filter(|f| prefix_label(f).is_none())
                .collect();
            ensure!(
                unnamed.is_empty(),
                "cannot tell the layout of {}: folder(s) {} are neither bags named normal_*/abnormal_* nor the pooled positive/ and negative/; label bags of other names with --labels labels.csv",
                input.display(),
                quoted_list(&unnamed)
            );
            Layout::Bags
        }
    };
    match layout {
        Layout::Pooled => {
            let others: Vec<&String> = folders
                .iter()
                .filter(|f| *f != "positive" && *f != "negative")
                .collect();
            ensure!(
                others.is_empty(),
                "the pooled layout has only positive/ and negative/, but {} also holds {}",
                input.display(),
                quoted_list(&others)
            );
            ensure!(
                folders.len() == 2,
                "the pooled layout needs both positive/ and negative/ in {}",
                input.display()
            );
            let bags = folders.into_iter().map(|f| {
                let label = match f.as_str() {
                    "positive" => BagLabel::Abnormal,
                    _ => BagLabel::Normal,
                };
                (f, label)
            });
            Ok(LabelledFolders {
                layout,
                bags: bags.collect(),
                unused_labels: 0,
            })
        }
        Layout::Bags => match &options.labels {
            Some(path) => {
                let labels = read_labels(path, "bag")?;
                let missing: Vec<&String> = folders
                    .iter()
                    .filter(|f| !labels.contains_key(*f))
                    .collect();
                ensure!(
                    missing.is_empty(),
                    "{} has no row for bag folder(s) {}; every folder of {} needs a label",
                    path.display(),
                    quoted_list(&missing),
                    input.display()
                );
                let unused = labels.len() - folders.len();
                let bags = folders.into_iter().map(|f| {
                    let label = labels[&f];
                    (f, label)
                });
                Ok(LabelledFolders {
                    layout,
                    bags: bags.collect(),
                    unused_labels: unused,
                })
            }
            None => {
                let mut bags = Vec::with_capacity(folders.len());
                let mut unnamed = Vec::new();
                for folder in folders {
                    match prefix_label(&folder) {
                        Some(label) => bags.push((folder, label)),
                        None => unnamed.push(folder),
                    }
                }
                ensure!(
                    unnamed.is_empty(),
                    "bag folder(s) {} of {} are named neither normal_* nor abnormal_*; label them with --labels labels.csv",
                    quoted_list(&unnamed.iter().collect::<Vec<_>>()),
                    input.display()
                );
                Ok(LabelledFolders {
                    layout,
                    bags,
                    unused_labels: 0,
                })
            }
        },
    }
}

/// The names of the folders in `dir` (not hidden), in natural order.
pub(crate) fn subfolders(dir: &Path) -> Result<Vec<String>> {
    ensure!(dir.is_dir(), "{} is not a folder", dir.display());
    let mut folders = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot read {}", dir.display()))?
            .path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name.filter(|n| !n.starts_with('.') && path.is_dir()) {
            folders.push(name);
        }
    }
    folders.sort_by(|a, b| natural_cmp(a, b));
    Ok(folders)
}

pub(crate) fn prefix_label(name: &str) -> Option<BagLabel> {
    if name.starts_with(NORMAL_PREFIX) {
        Some(BagLabel::Normal)
    } else if name.starts_with(ABNORMAL_PREFIX) {
        Some(BagLabel::Abnormal)
    } else {
        None
    }
}

/// `"a", "b", "c"` and how many more, for error messages about many names.
pub(crate) fn quoted_list(names: &[&String]) -> String {
    const SHOWN: usize = 5;
    let mut list: Vec<String> = names.iter().take(SHOWN).map(|n| format!("{n:?}")).collect();
    if names.len() > SHOWN {
        list.push(format!("and {} more", names.len() - SHOWN));
    }
    list.join(", ")
}

/// Reads a labels file: CSV with columns `key` (`bag` for `slam pack`) and `label` (other
/// columns are ignored).
pub(crate) fn read_labels(path: &Path, key: &str) -> Result<HashMap<String, BagLabel>> {
    let context = || format!("cannot read the labels file {}", path.display());
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(path)
        .with_context(context)?;
    let headers = reader.headers().with_context(context)?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                anyhow!(
                    "{} has no {name:?} column; its header must be `{key},label`",
                    path.display()
                )
            })
    };
    let (bag_column, label_column) = (column(key)?, column("label")?);
    let mut labels = HashMap::new();
    for record in reader.records() {
        let record = record.with_context(context)?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |c: usize| record.get(c).unwrap_or("");
        let (bag, label) = (field(bag_column), field(label_column));
        ensure!(
            !bag.is_empty(),
            "{} line {line}: the {key} name is empty",
            path.display()
        );
        let label = parse_label(label).ok_or_else(|| {
            anyhow!(
                "{} line {line}: {key} {bag:?} has the unknown label {label:?}; labels are normal or abnormal (also negative/positive, 0/1)",
                path.display()
            )
        })?;
        if let Some(before) = labels.insert(bag.to_owned(), label) {
            ensure!(
                before == label,
                "{} line {line}: {key} {bag:?} is labelled both {before} and {label}",
                path.display()
            );
        }
    }
    Ok(labels)
}

pub(crate) fn parse_label(label: &str) -> Option<BagLabel> {
    match label.to_ascii_lowercase().as_str() {
        "normal" | "negative" | "0" => Some(BagLabel::Normal),
        "abnormal" | "positive" | "1" => Some(BagLabel::Abnormal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut names = vec![
            "img10.png",
            "img2.png",
            "img1.png",
            "b/1.png",
            "a/10.png",
            "a/9.png",
            "img02.png",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            [
                "a/9.png",
                "a/10.png",
                "b/1.png",
                "img1.png",
                "img02.png",
                "img2.png",
                "img10.png"
            ]
        );
    }

    #[test]
    fn crop_offsets_round_half_to_even() {
        assert_eq!(crop_offset(5, 4), 0);
        assert_eq!(crop_offset(7, 4), 2);
        assert_eq!(crop_offset(9, 4), 2);
        assert_eq!(crop_offset(250, 224), 13);
    }

    #[test]
    fn labels_parse() {
        for (text, label) in [
            ("Normal", BagLabel::Normal),
            ("negative", BagLabel::Normal),
            ("0", BagLabel::Normal),
            ("abnormal", BagLabel::Abnormal),
            ("POSITIVE", BagLabel::Abnormal),
            ("1", BagLabel::Abnormal),
        ] {
            assert_eq!(parse_label(text), Some(label), "{text}");
        }
        assert_eq!(parse_label("maybe"), None);
    }
}
