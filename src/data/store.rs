//! The packed patch store: one file holding every patch of a dataset as u8 HWC pixels, with a
//! bag table (name, bag label, patch range) and per-patch instance truth and source names.
//!
//! Layout (all integers little-endian):
//!
//! ```text
//! 0            header (128 bytes, below), then zeros up to PATCHES_OFFSET
//! 4096         patches: patch_count x (height x width x 3) bytes, bag after bag
//! bags_offset  bag table: bag_count x BagRecord (32 bytes)
//! inst_offset  instance truth: patch_count bytes (0 normal, 1 abnormal, 255 unknown)
//! src_offset   source names: patch_count x TextRecord (16 bytes)
//! text_offset  UTF-8 text that the bag and source records point into
//! ```
//!
//! Tables come after the pixels so a store is written in one streaming pass; the header is
//! written last, into a temporary file that is renamed into place (an interrupted pack never
//! leaves a file that looks valid). The header carries a CRC-32 of itself and of the tables
//! (checked on every open) and of the pixels (checked by [`PatchStore::verify_pixels`],
//! which reads the whole file).

use std::collections::HashSet;
use std::fmt;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use bytemuck::{Pod, Zeroable};
use memmap2::Mmap;

use crate::atomic::AtomicFile;

pub const MAGIC: [u8; 8] = *b"SLAMPATC";
pub const VERSION: u32 = 1;
/// Where the pixels start: a page boundary, so the pixel array is page aligned in the map.
pub const PATCHES_OFFSET: u64 = 4096;
/// Largest patch side accepted: bounds every size computed from a header.
pub const MAX_PATCH_SIDE: u32 = 8192;
const HEADER_BYTES: usize = size_of::<Header>();
const UNKNOWN_INSTANCE: u8 = 255;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Header {
    magic: [u8; 8],
    version: u32,
    header_bytes: u32,
    patch_height: u32,
    patch_width: u32,
    channels: u32,
    bag_count: u32,
    patch_count: u64,
    bags_offset: u64,
    instances_offset: u64,
    sources_offset: u64,
    text_offset: u64,
    text_len: u64,
    file_len: u64,
    pixels_crc32: u32,
    tables_crc32: u32,
    header_crc32: u32,
    reserved: [u32; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct BagRecord {
    first_patch: u64,
    patch_count: u64,
    name: TextRecord,
}

/// A string in the text area: byte offset and length.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TextRecord {
    start: u64,
    len: u32,
    /// Bag records keep the bag label here (0 normal, 1 abnormal); source records keep 0.
    tag: u32,
}

/// A bag's label: normal (slide-negative) or abnormal (slide-positive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BagLabel {
    Normal,
    Abnormal,
}

impl BagLabel {
    pub fn is_abnormal(self) -> bool {
        self == BagLabel::Abnormal
    }

    fn code(self) -> u32 {
        self.is_abnormal() as u32
    }
}

impl fmt::Display for BagLabel {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            BagLabel::Normal => "normal",
            BagLabel::Abnormal => "abnormal",
        })
    }
}

/// Size of every patch in a store (3 channels, u8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PatchSize {
    pub height: usize,
    pub width: usize,
}

impl PatchSize {
    pub fn square(side: usize) -> Self {
        Self {
            height: side,
            width: side,
        }
    }

    pub fn bytes(self) -> usize {
        self.height * self.width * 3
    }

    fn validate(self) -> Result<()> {
        let max = MAX_PATCH_SIDE as usize;
        ensure!(
            (1..=max).contains(&self.height) && (1..=max).contains(&self.width),
            "patch size {}x{} is outside 1..={max} pixels per side",
            self.height,
            self.width
        );
        Ok(())
    }
}

impl fmt::Display for PatchSize {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}x{}", self.height, self.width)
    }
}

/// One bag of a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bag {
    pub name: String,
    pub label: BagLabel,
    /// Indices of the bag's patches in the store.
    pub patches: Range<usize>,
}

/// Counts of a written or opened store.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreSummary {
    pub patch_size: PatchSize,
    pub bags: usize,
    pub abnormal_bags: usize,
    pub patches: usize,
    /// Patches in abnormal bags (the pretraining pool P).
    pub abnormal_bag_patches: usize,
    /// Patches whose instance label is known to be abnormal.
    pub abnormal_instances: usize,
    pub bytes: u64,
}

/// Writes a store, bag by bag, patch by patch; see the module documentation for the layout.
pub struct StoreWriter {
    file: BufWriter<AtomicFile>,
    patch_size: PatchSize,
    bags: Vec<BagRecord>,
    bag_names: HashSet<String>,
    instances: Vec<u8>,
    sources: Vec<TextRecord>,
    text: Vec<u8>,
    pixels_crc: crc32fast::Hasher,
}

impl StoreWriter {
    /// Starts a store at `path` (nothing appears there until [`StoreWriter::finish`]).
    pub fn create(path: &Path, patch_size: PatchSize) -> Result<Self> {
        patch_size.validate()?;
        let mut file = BufWriter::with_capacity(1 << 20, AtomicFile::create(path)?);
        file.write_all(&[0; PATCHES_OFFSET as usize])?;
        Ok(Self {
            file,
            patch_size,
            bags: Vec::new(),
            bag_names: HashSet::new(),
            instances: Vec::new(),
            sources: Vec::new(),
            text: Vec::new(),
            pixels_crc: crc32fast::Hasher::new(),
        })
    }

    pub fn patch_size(&self) -> PatchSize {
        self.patch_size
    }

    /// Starts a new bag; the patches pushed from now on belong to it.
    pub fn begin_bag(&mut self, name: &str, label: BagLabel) -> Result<()> {
        self.check_last_bag_nonempty()?;
        ensure!(!name.is_empty(), "a bag name must not be empty");
        ensure!(
            self.bag_names.insert(name.to_owned()),
            "two bags are named {name:?}: bag names must be unique"
        );
        ensure!(self.bags.len() < u32::MAX as usize, "too many bags");
        let name = self.push_text(name, label.code())?;
        self.bags.push(BagRecord {
            first_patch: self.instances.len() as u64,
            patch_count: 0,
            name,
        });
        Ok(())
    }

    /// Appends one patch (u8 HWC, RGB) to the current bag, with its instance label when known
    /// (`Some(true)`: abnormal cell) and where it came from (a file name, may be empty).
    pub fn push_patch(
        &mut self,
        pixels: &[u8],
        instance: Option<bool>,
        source: &str,
    ) -> Result<()> {
        let bag = self
            .bags
            .last_mut()
            .ok_or_else(|| anyhow!("a patch was pushed before any bag was begun"))?;
        ensure!(
            pixels.len() == self.patch_size.bytes(),
            "a patch has {} bytes; a {} RGB patch has {}",
            pixels.len(),
            self.patch_size,
            self.patch_size.bytes()
        );
        bag.patch_count += 1;
        self.instances.push(match instance {
            None => UNKNOWN_INSTANCE,
            Some(abnormal) => abnormal as u8,
        });
        let source = self.push_text(source, 0)?;
        self.sources.push(source);
        self.pixels_crc.update(pixels);
        self.file.write_all(pixels).context("cannot write a patch")
    }

    /// Writes the tables and the header and moves the file into place.
    pub fn finish(mut self) -> Result<StoreSummary> {
        self.check_last_bag_nonempty()?;
        ensure!(!self.bags.is_empty(), "a store needs at least one bag");
        let patch_count = self.instances.len() as u64;
        let mut offset = PATCHES_OFFSET + patch_count * self.patch_size.bytes() as u64;
        let mut tables_crc = crc32fast::Hasher::new();
        let mut offsets = [0u64; 4];
        let tables: [&[u8]; 4] = [
            bytemuck::cast_slice(&self.bags),
            &self.instances,
            bytemuck::cast_slice(&self.sources),
            &self.text,
        ];
        for (slot, table) in offsets.iter_mut().zip(tables) {
            let padding = offset.next_multiple_of(8) - offset;
            self.file.write_all(&[0; 8][..padding as usize])?;
            offset += padding;
            *slot = offset;
            self.file.write_all(table)?;
            tables_crc.update(table);
            offset += table.len() as u64;
        }
        let mut header = Header {
            magic: MAGIC,
            version: VERSION,
            header_bytes: HEADER_BYTES as u32,
            patch_height: self.patch_size.height as u32,
            patch_width: self.patch_size.width as u32,
            channels: 3,
            bag_count: self.bags.len() as u32,
            patch_count,
            bags_offset: offsets[0],
            instances_offset: offsets[1],
            sources_offset: offsets[2],
            text_offset: offsets[3],
            text_len: self.text.len() as u64,
            file_len: offset,
            pixels_crc32: self.pixels_crc.clone().finalize(),
            tables_crc32: tables_crc.finalize(),
            header_crc32: 0,
            reserved: [0; 5],
        };
        header.header_crc32 = crc32fast::hash(bytemuck::bytes_of(&header));
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| e.into_error())
            .context("cannot write the store")?;
        file.file().seek(SeekFrom::Start(0))?;
        file.file().write_all(bytemuck::bytes_of(&header))?;
        file.commit()?;
        let abnormal: Vec<&BagRecord> = self.bags.iter().filter(|b| b.name.tag == 1).collect();
        Ok(StoreSummary {
            patch_size: self.patch_size,
            bags: self.bags.len(),
            abnormal_bags: abnormal.len(),
            patches: patch_count as usize,
            abnormal_bag_patches: abnormal.iter().map(|b| b.patch_count as usize).sum(),
            abnormal_instances: self.instances.iter().filter(|&&i| i == 1).count(),
            bytes: offset,
        })
    }

    fn check_last_bag_nonempty(&self) -> Result<()> {
        if let Some(bag) = self.bags.last() {
            ensure!(
                bag.patch_count > 0,
                "bag {:?} has no patches",
                text_at(&self.text, bag.name)
            );
        }
        Ok(())
    }

    fn push_text(&mut self, text: &str, tag: u32) -> Result<TextRecord> {
        ensure!(
            text.len() <= u32::MAX as usize,
            "a name of {} bytes is too long",
            text.len()
        );
        let record = TextRecord {
            start: self.text.len() as u64,
            len: text.len() as u32,
            tag,
        };
        self.text.extend_from_slice(text.as_bytes());
        Ok(record)
    }
}

fn text_at(text: &[u8], record: TextRecord) -> &str {
    let start = record.start as usize;
    std::str::from_utf8(&text[start..start + record.len as usize]).unwrap_or("")
}

/// An opened store: the file memory-mapped, its tables validated.
pub struct PatchStore {
    path: PathBuf,
    map: Mmap,
    header: Header,
    bags: Vec<Bag>,
}

impl PatchStore {
    /// Opens and validates a store: header, sizes, offsets, table checksums and every bag
    /// and name record. The pixels are not read (see [`PatchStore::verify_pixels`]).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open patch store {}", path.display()))?;
        // SAFETY: the map is read-only; the store is never written in place (writers rename a
        // new file over it), so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map patch store {}", path.display()))?;
        let (header, bags) = validate(&map)
            .with_context(|| format!("{} is not a usable patch store", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header,
            bags,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn patch_size(&self) -> PatchSize {
        PatchSize {
            height: self.header.patch_height as usize,
            width: self.header.patch_width as usize,
        }
    }

    /// Number of patches.
    pub fn len(&self) -> usize {
        self.header.patch_count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bags(&self) -> &[Bag] {
        &self.bags
    }

    /// Every patch's pixels, patch after patch (u8 HWC), straight from the map.
    pub fn pixels(&self) -> &[u8] {
        let start = PATCHES_OFFSET as usize;
        &self.map[start..start + self.len() * self.patch_size().bytes()]
    }

    /// Patch `index`'s pixels (u8 HWC, RGB).
    pub fn patch(&self, index: usize) -> &[u8] {
        let bytes = self.patch_size().bytes();
        &self.pixels()[index * bytes..(index + 1) * bytes]
    }

    /// The instance label of patch `index` when known: `Some(true)` for an abnormal cell.
    pub fn instance(&self, index: usize) -> Option<bool> {
        match self.map[self.header.instances_offset as usize + index] {
            UNKNOWN_INSTANCE => None,
            label => Some(label == 1),
        }
    }

    /// Where patch `index` came from (a file name; empty when not recorded).
    pub fn source(&self, index: usize) -> &str {
        let record = self.source_records()[index];
        text_at(self.text(), record)
    }

    /// Indices of every patch in bags with `label`: the pretraining pools P (abnormal) and N.
    pub fn pool(&self, label: BagLabel) -> Vec<u32> {
        self.bags
            .iter()
            .filter(|bag| bag.label == label)
            .flat_map(|bag| bag.patches.start as u32..bag.patches.end as u32)
            .collect()
    }

    pub fn summary(&self) -> StoreSummary {
        let abnormal: Vec<&Bag> = self.bags.iter().filter(|b| b.label.is_abnormal()).collect();
        StoreSummary {
            patch_size: self.patch_size(),
            bags: self.bags.len(),
            abnormal_bags: abnormal.len(),
            patches: self.len(),
            abnormal_bag_patches: abnormal.iter().map(|b| b.patches.len()).sum(),
            abnormal_instances: (0..self.len())
                .filter(|&i| self.instance(i) == Some(true))
                .count(),
            bytes: self.header.file_len,
        }
    }

    /// Identifies the store's contents (its table and pixel checksums): a resumed run checks
    /// it is reading the same data.
    pub fn fingerprint(&self) -> String {
        format!(
            "{:08x}{:08x}",
            self.header.tables_crc32, self.header.pixels_crc32
        )
    }

    /// Reads every pixel and checks it against the checksum written with the store.
    pub fn verify_pixels(&self) -> Result<()> {
        let crc = crc32fast::hash(self.pixels());
        ensure!(
            crc == self.header.pixels_crc32,
            "{}: the patch pixels are corrupt (checksum {crc:08x}, expected {:08x})",
            self.path.display(),
            self.header.pixels_crc32
        );
        Ok(())
    }

    fn text(&self) -> &[u8] {
        let start = self.header.text_offset as usize;
        &self.map[start..start + self.header.text_len as usize]
    }

    fn source_records(&self) -> &[TextRecord] {
        let start = self.header.sources_offset as usize;
        bytemuck::cast_slice(&self.map[start..start + self.len() * size_of::<TextRecord>()])
    }
}

/// Checks everything about a mapped store except the pixel values.
fn validate(bytes: &[u8]) -> Result<(Header, Vec<Bag>)> {
    ensure!(
        bytes.len() >= HEADER_BYTES,
        "the file has {} bytes, fewer than a store header",
        bytes.len()
    );
    let header: Header = bytemuck::pod_read_unaligned(&bytes[..HEADER_BYTES]);
    ensure!(
        header.magic == MAGIC,
        "it does not start with the patch store signature (write one with `slam pack`, `slam bags`, `slam tile` or `slam synth`)"
    );
    ensure!(
        header.version == VERSION,
        "store format version {} is not supported (this build reads version {VERSION})",
        header.version
    );
    let mut unsigned = header;
    unsigned.header_crc32 = 0;
    ensure!(
        crc32fast::hash(bytemuck::bytes_of(&unsigned)) == header.header_crc32
            && header.header_bytes as usize == HEADER_BYTES,
        "the header is corrupt (checksum mismatch)"
    );
    ensure!(
        header.file_len == bytes.len() as u64,
        "the file is truncated or has trailing data: the header says {} bytes, the file has {}",
        header.file_len,
        bytes.len()
    );
    ensure!(
        header.channels == 3,
        "{} channels per pixel; stores hold RGB",
        header.channels
    );
    let patch_size = PatchSize {
        height: header.patch_height as usize,
        width: header.patch_width as usize,
    };
    patch_size.validate()?;
    let patch_count = usize::try_from(header.patch_count)?;
    let bag_count = header.bag_count as usize;
    let pixel_end = (patch_count as u64)
        .checked_mul(patch_size.bytes() as u64)
        .and_then(|b| b.checked_add(PATCHES_OFFSET))
        .ok_or_else(|| anyhow!("the patch count {patch_count} is impossibly large"))?;
    let tables = [
        ("bag table", header.bags_offset, bag_count as u64 * 32),
        (
            "instance table",
            header.instances_offset,
            patch_count as u64,
        ),
        (
            "source table",
            header.sources_offset,
            patch_count as u64 * 16,
        ),
        ("text", header.text_offset, header.text_len),
    ];
    let mut end = pixel_end;
    let mut tables_crc = crc32fast::Hasher::new();
    for (name, offset, len) in tables {
        ensure!(
            offset >= end && offset % 8 == 0 && offset - end < 8,
            "the {name} is not where the layout puts it (offset {offset})"
        );
        end = offset
            .checked_add(len)
            .filter(|&e| e <= header.file_len)
            .ok_or_else(|| anyhow!("the {name} runs past the end of the file"))?;
        tables_crc.update(&bytes[offset as usize..end as usize]);
    }
    ensure!(
        end == header.file_len,
        "the file has {} unexpected bytes after its tables",
        header.file_len - end
    );
    ensure!(
        tables_crc.finalize() == header.tables_crc32,
        "the bag, label or name tables are corrupt (checksum mismatch)"
    );

    let table = |offset: u64, len: usize| &bytes[offset as usize..offset as usize + len];
    let text = table(header.text_offset, header.text_len as usize);
    let read_text = |record: TextRecord, what: &dyn Fn() -> String| -> Result<String> {
        let range = record
            .start
            .checked_add(record.len as u64)
            .filter(|&e| e <= text.len() as u64);
        let range =
            range.ok_or_else(|| anyhow!("the name of {} lies outside the text area", what()))?;
        std::str::from_utf8(&text[record.start as usize..range as usize])
            .map(str::to_owned)
            .map_err(|_| anyhow!("the name of {} is not UTF-8", what()))
    };
    let records: Vec<BagRecord> =
        bytemuck::pod_collect_to_vec(table(header.bags_offset, bag_count * 32));
    ensure!(bag_count > 0, "the store has no bags");
    let mut bags = Vec::with_capacity(bag_count);
    let mut next_patch = 0u64;
    for (i, record) in records.iter().enumerate() {
        let name = read_text(record.name, &|| format!("bag {i}"))?;
        let label = match record.name.tag {
            0 => BagLabel::Normal,
            1 => BagLabel::Abnormal,
            other => bail!("bag {name:?} has label code {other}; labels are 0 or 1"),
        };
        ensure!(
            record.first_patch == next_patch && record.patch_count > 0,
            "bag {name:?} covers patches {}..+{}; bags must cover the patches in order, each non-empty",
            record.first_patch,
            record.patch_count
        );
        next_patch = record
            .first_patch
            .checked_add(record.patch_count)
            .filter(|&n| n <= patch_count as u64)
            .ok_or_else(|| anyhow!("bag {name:?} runs past the last patch"))?;
        bags.push(Bag {
            name,
            label,
            patches: record.first_patch as usize..next_patch as usize,
        });
    }
    ensure!(
        next_patch == patch_count as u64,
        "the bags cover {next_patch} of the {patch_count} patches"
    );
    let instances = table(header.instances_offset, patch_count);
    if let Some(i) = instances
        .iter()
        .position(|&v| v > 1 && v != UNKNOWN_INSTANCE)
    {
        bail!("patch {i} has instance label code {}", instances[i]);
    }
    let sources: &[TextRecord] =
        bytemuck::try_cast_slice(table(header.sources_offset, patch_count * 16))
            .map_err(|e| anyhow!("the source table cannot be read: {e}"))?;
    for (i, &record) in sources.iter().enumerate() {
        read_text(record, &|| format!("the source of patch {i}"))?;
    }
    Ok((header, bags))
}
