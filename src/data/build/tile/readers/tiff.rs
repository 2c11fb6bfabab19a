//! Plain TIFF and BigTIFF slides, tiled or stripped, read chunk by chunk with the `tiff`
//! crate: the pyramid levels found in the IFD chain or the first page's SubIFDs, any page
//! opened by pointing a rewritten header at it, 8-bit RGB, RGBA, greyscale or YCbCr pixels.
//!
//! Slides come from anywhere, so a level is checked before it is read: every chunk within
//! the file, a chunk's decoded size within [`MAX_CHUNK_BYTES`], the level's within
//! [`MAX_EXPANSION`] times the file's, and each JPEG chunk's frame within its chunk
//! (`tests/fuzz.rs` corrupts slides of every layout read here).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tiff::decoder::{Decoder, DecodingResult};
use tiff::tags::{CompressionMethod, Tag};

use super::{Dims, LevelReader, SlideSource};
use crate::data::build::tile::MAX_CHUNK_BYTES;

/// Pages of a TIFF examined for pyramid levels: bounds the walk over a broken file.
const MAX_PAGES: usize = 64;
/// Most decoded bytes of a level per byte of the file. Slides compress 10 to 100 times; a
/// small file claiming a level far larger (its chunks sharing one well-compressed stream)
/// would take hours to decode.
const MAX_EXPANSION: u64 = 10_000;

/// The 8-bit pixel layouts read from TIFF pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pixels {
    Rgb,
    Rgba,
    Gray,
    /// JPEG-compressed pages store YCbCr, which the decoder leaves as it is.
    YCbCr,
}

impl Pixels {
    fn of(color: tiff::ColorType) -> Option<Self> {
        match color {
            tiff::ColorType::RGB(8) => Some(Pixels::Rgb),
            tiff::ColorType::RGBA(8) => Some(Pixels::Rgba),
            tiff::ColorType::Gray(8) => Some(Pixels::Gray),
            tiff::ColorType::YCbCr(8) => Some(Pixels::YCbCr),
            _ => None,
        }
    }

    fn samples(self) -> usize {
        match self {
            Pixels::Rgb | Pixels::YCbCr => 3,
            Pixels::Rgba => 4,
            Pixels::Gray => 1,
        }
    }

    /// Converts to RGB into `out` (alpha is dropped, as `slam pack` does).
    fn to_rgb(self, data: Vec<u8>, out: &mut Vec<u8>) {
        out.clear();
        match self {
            Pixels::Rgb => *out = data,
            Pixels::Rgba => out.extend(data.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]])),
            Pixels::Gray => out.extend(data.iter().flat_map(|&g| [g, g, g])),
            Pixels::YCbCr => out.extend(data.chunks_exact(3).flat_map(|p| {
                // JFIF's full-range BT.601 conversion, as JPEG decoders apply it.
                let (y, cb, cr) = (
                    f32::from(p[0]),
                    f32::from(p[1]) - 128.0,
                    f32::from(p[2]) - 128.0,
                );
                [
                    y + 1.402 * cr,
                    y - 0.344_136 * cb - 0.714_136 * cr,
                    y + 1.772 * cb,
                ]
                .map(|v| v.round().clamp(0.0, 255.0) as u8)
            })),
        }
    }
}

/// A TIFF file's header facts.
#[derive(Clone, Copy, Debug)]
struct TiffHeader {
    little_endian: bool,
    big: bool,
}

impl TiffHeader {
    /// A header whose first IFD is at `ifd`, so that a decoder opens that page as its first.
    fn pointing_at(&self, ifd: u64) -> Result<Vec<u8>> {
        let u16b = |v: u16| {
            if self.little_endian {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            }
        };
        let mut header = if self.little_endian {
            b"II".to_vec()
        } else {
            b"MM".to_vec()
        };
        if self.big {
            header.extend(u16b(43));
            header.extend(u16b(8));
            header.extend(u16b(0));
            header.extend(if self.little_endian {
                ifd.to_le_bytes()
            } else {
                ifd.to_be_bytes()
            });
        } else {
            let ifd =
                u32::try_from(ifd).context("an IFD offset is beyond 4 GiB in a classic TIFF")?;
            header.extend(u16b(42));
            header.extend(if self.little_endian {
                ifd.to_le_bytes()
            } else {
                ifd.to_be_bytes()
            });
        }
        Ok(header)
    }
}

/// The file seen with its header replaced: the `tiff` decoder opens only pages of the main
/// chain, so a page anywhere (a SubIFD) is opened by pointing the header at it.
struct PageReader {
    file: BufReader<File>,
    header: Vec<u8>,
    len: u64,
    pos: u64,
    /// The file's position is `pos` (reads from the header move only `pos`).
    synced: bool,
}

impl Read for PageReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(rest) = self
            .header
            .get(self.pos as usize..)
            .filter(|r| !r.is_empty())
        {
            let n = rest.len().min(buf.len());
            buf[..n].copy_from_slice(&rest[..n]);
            self.pos += n as u64;
            self.synced = false;
            return Ok(n);
        }
        if self.pos >= self.len {
            // Past the end (where a seek may even be refused).
            return Ok(0);
        }
        if !self.synced {
            self.file.seek(SeekFrom::Start(self.pos))?;
            self.synced = true;
        }
        let n = self.file.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PageReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        }
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        if pos != self.pos {
            self.pos = pos;
            self.synced = false;
        }
        Ok(pos)
    }
}

/// A page of a TIFF usable as a pyramid level.
#[derive(Clone, Copy, Debug)]
struct TiffPage {
    ifd: u64,
    dims: Dims,
    pixels: Pixels,
    /// JPEG-compressed.
    jpeg: bool,
}

/// A TIFF file, from which decoders are opened at any page.
#[derive(Clone, Debug)]
struct TiffFile {
    path: PathBuf,
    header: TiffHeader,
    len: u64,
}

type TiffDecoder = Decoder<PageReader>;

impl TiffFile {
    /// A decoder at the page whose IFD is at `ifd` (`None`: the file's first page).
    fn decoder(&self, ifd: Option<u64>) -> Result<TiffDecoder> {
        let file = File::open(&self.path).context("cannot open it")?;
        let header = match ifd {
            Some(ifd) => self.header.pointing_at(ifd)?,
            None => Vec::new(),
        };
        let reader = PageReader {
            file: BufReader::new(file),
            header,
            len: self.len,
            pos: 0,
            synced: true,
        };
        // The decoder's default limits bound each buffer it takes for tag values or a chunk to
        // 256 MiB (the default memory budget); `open_level` bounds the decoded chunks.
        Decoder::new(reader).map_err(tiff_error)
    }
}

/// A plain TIFF: the first page is level 0; the other pages (of the IFD chain, or the first
/// page's SubIFDs) that are smaller with the same aspect ratio are its lower levels.
pub(super) struct TiffSlide {
    file: TiffFile,
    levels: Vec<TiffPage>,
    dims: Vec<Dims>,
}

impl TiffSlide {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).context("cannot open it")?;
        let len = file.metadata().context("cannot open it")?.len();
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .context("it is too short to be a TIFF file")?;
        let little_endian = &head[..2] == b"II";
        let magic = if little_endian {
            u16::from_le_bytes([head[2], head[3]])
        } else {
            u16::from_be_bytes([head[2], head[3]])
        };
        let mut slide = Self {
            file: TiffFile {
                path: path.to_path_buf(),
                header: TiffHeader {
                    little_endian,
                    big: magic == 43,
                },
                len,
            },
            levels: Vec::new(),
            dims: Vec::new(),
        };
        let mut pages = Vec::new();
        let mut decoder = slide.file.decoder(None)?;
        let mut sub_ifds = Vec::new();
        for index in 0..MAX_PAGES {
            let page = describe_page(&mut decoder);
            if index == 0 {
                // Level 0 must be readable; later pages that are not are just not levels.
                let page = page?;
                let pixels = page.pixels.map_err(|why| anyhow!("{why}"))?;
                ensure!(!page.planar, "planar TIFF pages are not supported");
                ensure!(
                    page.dims.width > 0 && page.dims.height > 0,
                    "the image is empty"
                );
                sub_ifds = (decoder.find_tag_unsigned_vec::<u64>(Tag::SubIfd))
                    .map_err(tiff_error)?
                    .unwrap_or_default();
                sub_ifds.truncate(MAX_PAGES);
                slide.levels.push(TiffPage {
                    ifd: page.ifd,
                    dims: page.dims,
                    pixels,
                    jpeg: page.jpeg,
                });
            } else if let Ok(page) = page {
                pages.push(page);
            }
            if !decoder.more_images() {
                break;
            }
            if decoder.next_image().is_err() {
                break;
            }
        }
        for ifd in sub_ifds {
            if let Ok(page) =
                (slide.file.decoder(Some(ifd))).and_then(|mut d| describe_page(&mut d))
            {
                pages.push(page);
            }
        }
        let base = slide.levels[0].dims;
        let mut lower: Vec<TiffPage> = pages
            .into_iter()
            .filter(|p| !p.planar && !p.mask)
            .filter(|p| p.dims.width < base.width && p.dims.height < base.height)
            .filter(|p| p.dims.width > 0 && p.dims.height > 0)
            // The same aspect ratio up to rounding each side by less than a pixel.
            .filter(|p| {
                let cross = |a: u64, b: u64| u128::from(a) * u128::from(b);
                cross(p.dims.width, base.height).abs_diff(cross(p.dims.height, base.width))
                    <= u128::from(base.width + base.height)
            })
            .filter_map(|p| {
                Some(TiffPage {
                    ifd: p.ifd,
                    dims: p.dims,
                    pixels: p.pixels.ok()?,
                    jpeg: p.jpeg,
                })
            })
            .collect();
        lower.sort_by_key(|p| std::cmp::Reverse(p.dims.width));
        lower.dedup_by_key(|p| p.dims.width);
        slide.levels.extend(lower);
        slide.dims = slide.levels.iter().map(|p| p.dims).collect();
        Ok(slide)
    }
}

/// What a page is, as far as choosing levels goes.
struct PageFacts {
    ifd: u64,
    dims: Dims,
    /// The pixels, or why they cannot be read.
    pixels: std::result::Result<Pixels, String>,
    jpeg: bool,
    planar: bool,
    /// NewSubfileType says transparency mask.
    mask: bool,
}

fn describe_page(decoder: &mut TiffDecoder) -> Result<PageFacts> {
    let ifd = decoder
        .ifd_pointer()
        .ok_or_else(|| anyhow!("a page has no IFD"))?
        .0;
    let (width, height) = decoder.dimensions().map_err(tiff_error)?;
    let color = decoder.colortype().map_err(tiff_error)?;
    let planar = decoder
        .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
        .map_err(tiff_error)?
        == Some(2);
    let subfile = decoder
        .find_tag_unsigned::<u32>(Tag::NewSubfileType)
        .map_err(tiff_error)?
        .unwrap_or(0);
    let jpeg = decoder
        .find_tag_unsigned::<u16>(Tag::Compression)
        .map_err(tiff_error)?
        == Some(CompressionMethod::ModernJPEG.to_u16());
    let mut pixels = Pixels::of(color).ok_or_else(|| {
        format!("its pixels are {color:?}; slides must be 8-bit RGB, RGBA, greyscale or YCbCr")
    });
    if pixels == Ok(Pixels::YCbCr) {
        // The decoder reads YCbCr samples one per pixel: subsampled chroma (the TIFF default,
        // 2x2) is undone only by the JPEG decoder.
        let subsampling = decoder
            .find_tag_unsigned_vec::<u16>(Tag::ChromaSubsampling)
            .map_err(tiff_error)?
            .unwrap_or_else(|| vec![2, 2]);
        if !jpeg && subsampling != [1, 1] {
            pixels = Err(format!(
                "its pixels are YCbCr with chroma subsampled {subsampling:?} and not JPEG-compressed, which is not supported; re-save the slide as RGB"
            ));
        }
    }
    Ok(PageFacts {
        ifd,
        dims: Dims {
            width: u64::from(width),
            height: u64::from(height),
        },
        pixels,
        jpeg,
        planar,
        mask: subfile & 4 != 0,
    })
}

fn tiff_error(err: tiff::TiffError) -> anyhow::Error {
    anyhow!("it is not a readable TIFF: {}", reason(err))
}

/// Longest reason quoted from the decoder, in characters.
const MAX_REASON_CHARS: usize = 300;

/// What the decoder found wrong, in words: a read past the end of the file means that a
/// structure or chunk says it lies where the file has no bytes. The decoder quotes a field's
/// values, which in a corrupt file can be tens of thousands of numbers: cut to
/// [`MAX_REASON_CHARS`].
fn reason(err: tiff::TiffError) -> String {
    match err {
        tiff::TiffError::IoError(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            "it points past the end of the file (truncated or corrupt)".into()
        }
        other => {
            let text = other.to_string();
            match text.char_indices().nth(MAX_REASON_CHARS) {
                Some((cut, _)) => format!("{} ...", &text[..cut]),
                None => text,
            }
        }
    }
}

impl SlideSource for TiffSlide {
    fn levels(&self) -> &[Dims] {
        &self.dims
    }

    fn open_level(&self, level: usize) -> Result<Box<dyn LevelReader>> {
        let page = self.levels[level];
        let mut decoder = self.file.decoder(Some(page.ifd))?;
        let strips = decoder.get_chunk_type() == tiff::decoder::ChunkType::Strip;
        let stored = decoder.chunk_dimensions();
        let stored = (u64::from(stored.0), u64::from(stored.1));
        let dims = page.dims;
        let (cw, ch) = (stored.0, stored.1.min(dims.height));
        ensure!(cw > 0 && ch > 0, "its chunk size is {cw}x{ch}");
        let what = if strips { "strip" } else { "tile" };
        let level_bytes = (dims.width)
            .saturating_mul(dims.height)
            .saturating_mul(page.pixels.samples() as u64);
        ensure!(
            level_bytes / MAX_EXPANSION <= self.file.len,
            "level {level} claims {}x{} pixels, {level_bytes} bytes decoded, from a file of {} bytes: more than the {MAX_EXPANSION} to 1 this reader accepts, so the file is corrupt",
            dims.width,
            dims.height,
            self.file.len
        );
        // Decoded chunks are clipped to the image (a tile may be wider than it), except JPEG
        // ones, decoded whole first; the bound holds for the decoded samples and for their RGB
        // conversion.
        let decoded = if page.jpeg {
            stored
        } else {
            (cw.min(dims.width), ch)
        };
        let chunk_bytes = (decoded.0)
            .saturating_mul(decoded.1)
            .saturating_mul(page.pixels.samples().max(3) as u64);
        ensure!(
            chunk_bytes <= MAX_CHUNK_BYTES as u64,
            "a {what} of level {level} is {cw}x{ch} pixels, more than the {} MiB read at once; re-save the slide tiled (e.g. `vips tiffsave in.tif out.tif --tile --pyramid`)",
            MAX_CHUNK_BYTES >> 20
        );
        // Every chunk must lie within the file: a truncated file is reported here, by name,
        // rather than by a failing read midway.
        let (offsets, counts) = if strips {
            (Tag::StripOffsets, Tag::StripByteCounts)
        } else {
            (Tag::TileOffsets, Tag::TileByteCounts)
        };
        let offsets = decoder.get_tag_u64_vec(offsets).map_err(tiff_error)?;
        let counts = decoder.get_tag_u64_vec(counts).map_err(tiff_error)?;
        for (i, (&offset, &count)) in offsets.iter().zip(&counts).enumerate() {
            let end = offset.checked_add(count);
            ensure!(
                end.is_some_and(|e| e <= self.file.len),
                "the file is truncated: {what} {i} of level {level} lies at bytes {offset}..{} but the file has {} bytes",
                end.map_or_else(|| "?".into(), |e| e.to_string()),
                self.file.len
            );
        }
        let jpeg_streams = if page.jpeg {
            offsets
                .iter()
                .copied()
                .zip(counts.iter().copied())
                .collect()
        } else {
            Vec::new()
        };
        let reader = TiffLevel {
            file: self.file.clone(),
            level,
            page,
            chunk: (cw, ch),
            stored,
            across: dims.width.div_ceil(cw),
            what,
            jpeg_streams,
            pool: Mutex::new(vec![decoder]),
        };
        ensure!(
            reader.grid().0 * reader.grid().1 <= offsets.len() as u64,
            "level {level} has {} {what}s; its size needs {}",
            offsets.len(),
            reader.grid().0 * reader.grid().1
        );
        Ok(Box::new(reader))
    }
}

/// A TIFF page read chunk by chunk; each worker takes a decoder of its own from the pool.
struct TiffLevel {
    file: TiffFile,
    level: usize,
    page: TiffPage,
    chunk: (u64, u64),
    /// A chunk's size as stored (a tile past the image's edge is whole).
    stored: (u64, u64),
    across: u64,
    what: &'static str,
    /// Where each chunk's JPEG stream lies (offset, length), for JPEG pages.
    jpeg_streams: Vec<(u64, u64)>,
    pool: Mutex<Vec<TiffDecoder>>,
}

impl LevelReader for TiffLevel {
    fn dims(&self) -> Dims {
        self.page.dims
    }

    fn chunk_size(&self) -> (u64, u64) {
        self.chunk
    }

    fn read_chunk(&self, cx: u64, cy: u64, out: &mut Vec<u8>) -> Result<()> {
        let index = cy * self.across + cx;
        let popped = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut decoder = match popped {
            Some(decoder) => decoder,
            None => self.file.decoder(Some(self.page.ifd))?,
        };
        let context = || {
            format!(
                "cannot decode {} {index} of level {}",
                self.what, self.level
            )
        };
        let index32 = u32::try_from(index).with_context(context)?;
        // The JPEG decoder allocates and decodes the whole frame its stream's header claims:
        // check that it fits the chunk first.
        if let Some(&(offset, length)) = self.jpeg_streams.get(index as usize) {
            let frame = jpeg_frame_size(decoder.inner(), offset, length).with_context(context)?;
            if let Some((w, h)) = frame {
                let (sw, sh) = self.stored;
                ensure!(
                    w <= sw && h <= sh,
                    "{}: its JPEG stream claims {w}x{h} pixels, more than the {what}'s {sw}x{sh}",
                    context(),
                    what = self.what
                );
            }
        }
        let read = decoder.read_chunk(index32).map_err(|e| anyhow!(reason(e)));
        let data = match read.with_context(context)? {
            DecodingResult::U8(data) => data,
            _ => bail!("{}: the samples are not 8-bit", context()),
        };
        // The decoder is returned only after a clean read: one that failed may be midway.
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(decoder);
        let rect = self.chunk_rect(cx, cy);
        let expected = (rect.w * rect.h) as usize * self.page.pixels.samples();
        ensure!(
            data.len() == expected,
            "{}: {} bytes decoded, {expected} expected",
            context(),
            data.len()
        );
        self.page.pixels.to_rgb(data, out);
        Ok(())
    }
}

/// The frame size (width, height) in the header of the JPEG stream of `length` bytes at
/// `start`, read segment by segment; `None` when no frame header comes before the scan (the
/// decoder then says what is wrong).
fn jpeg_frame_size<R: Read + Seek>(
    reader: &mut R,
    start: u64,
    length: u64,
) -> io::Result<Option<(u64, u64)>> {
    let end = start.saturating_add(length);
    // Reads `buf` at `at` if it lies within the stream.
    let mut read = |at: u64, buf: &mut [u8]| -> io::Result<bool> {
        if at.saturating_add(buf.len() as u64) > end {
            return Ok(false);
        }
        reader.seek(SeekFrom::Start(at))?;
        reader.read_exact(buf)?;
        Ok(true)
    };
    let mut marker = [0u8; 2];
    if !read(start, &mut marker)? || marker != [0xFF, 0xD8] {
        return Ok(None);
    }
    // Each step moves on by at least a byte, so the walk ends within the stream.
    let mut at = start + 2;
    loop {
        if !read(at, &mut marker)? || marker[0] != 0xFF {
            return Ok(None);
        }
        match marker[1] {
            // Fill byte.
            0xFF => at += 1,
            // Start of frame (any coding; C4, C8 and CC are other markers): length, precision,
            // height, width.
            0xC0..=0xCF if !matches!(marker[1], 0xC4 | 0xC8 | 0xCC) => {
                let mut frame = [0u8; 7];
                if !read(at + 2, &mut frame)? {
                    return Ok(None);
                }
                let height = u16::from_be_bytes([frame[3], frame[4]]);
                let width = u16::from_be_bytes([frame[5], frame[6]]);
                return Ok(Some((u64::from(width), u64::from(height))));
            }
            // Start of scan, end of image: no frame header.
            0xDA | 0xD9 => return Ok(None),
            // Markers without a segment.
            0x01 | 0xD0..=0xD7 => at += 2,
            _ => {
                let mut len = [0u8; 2];
                if !read(at + 2, &mut len)? {
                    return Ok(None);
                }
                at += 2 + u64::from(u16::from_be_bytes(len));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut() {
        use tiff::tags::PhotometricInterpretation;
        let bits = vec![8u8; 20_000];
        let err = tiff::TiffUnsupportedError::InterpretationWithBits(
            PhotometricInterpretation::RGB,
            bits,
        );
        let text = reason(tiff::TiffError::UnsupportedError(err));
        assert!(text.starts_with("unsupported error: Photometric interpretation RGB"));
        assert!(text.ends_with(" ..."));
        assert_eq!(text.chars().count(), MAX_REASON_CHARS + 4);
        let short = tiff::TiffError::FormatError(tiff::TiffFormatError::TiffSignatureNotFound);
        assert!(!reason(short).ends_with("..."));
    }

    #[test]
    fn jpeg_frame_size_skips_segments_to_the_frame_header() {
        // SOI, a fill byte, APP0 (length 4), DQT (length 3), SOF0: 16 rows, 300 columns.
        let stream = [
            0xFF, 0xD8, 0xFF, 0xFF, 0xE0, 0, 4, 1, 2, 0xFF, 0xDB, 0, 3, 9, 0xFF, 0xC0, 0, 11, 8, 0,
            16, 1, 44, 3,
        ];
        let mut file = io::Cursor::new([&[7u8; 5][..], &stream].concat());
        let found = jpeg_frame_size(&mut file, 5, stream.len() as u64).unwrap();
        assert_eq!(found, Some((300, 16)));
        // Cut before the frame header ends, or a scan first: none.
        assert_eq!(jpeg_frame_size(&mut file, 5, 20).unwrap(), None);
        let scan = [0xFF, 0xD8, 0xFF, 0xDA, 0, 2];
        let mut file = io::Cursor::new(scan);
        assert_eq!(jpeg_frame_size(&mut file, 0, 6).unwrap(), None);
    }
}
