//! A small TIFF writer for the tests and bench of `slam tile`: 8-bit RGB, YCbCr (no chroma
//! subsampling) or grey pages, uncompressed or LZW, Deflate or JPEG (each chunk a JFIF stream,
//! its tables inline or shared in JPEGTables), tiled or stripped, classic TIFF or BigTIFF,
//! little- or big-endian, the pages after the first chained as reduced-resolution pages or
//! hung under the first as SubIFDs, each chunk's data stored or all pointing at one. The IFDs come first, then the pixel data; uncompressed
//! chunks are generated one group at a time from a function (a large slide takes little
//! memory), compressed ones are encoded first to know their sizes.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use image::ImageEncoder;
use rayon::prelude::*;
use tiff::encoder::compression::{CompressionAlgorithm, Deflate, Lzw};

/// How a page's pixels are cut.
#[derive(Clone, Copy, Debug)]
pub enum Chunks {
    /// Tiles of width x height.
    Tiles(u32, u32),
    /// Strips of this many rows.
    Strips(u32),
}

/// The samples stored for each pixel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Colour {
    #[default]
    Rgb,
    /// YCbCr by JFIF's full-range BT.601 matrix, without chroma subsampling.
    YCbCr,
    /// One sample, the pixel's [`luma`].
    Grey,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    #[default]
    None,
    Lzw,
    Deflate,
    /// Each chunk a baseline JFIF stream of quality [`JPEG_QUALITY`]: grey for
    /// [`Colour::Grey`], else YCbCr (the page says YCbCr, whether the colour is RGB or YCbCr).
    /// With `shared_tables`, the quantisation and Huffman tables go to JPEGTables and the
    /// chunks hold abbreviated streams.
    Jpeg {
        shared_tables: bool,
    },
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Coding {
    pub colour: Colour,
    pub compression: Compression,
}

pub struct Page<'a> {
    pub width: u32,
    pub height: u32,
    pub chunks: Chunks,
    pub pixel: &'a (dyn Fn(u32, u32) -> [u8; 3] + Sync),
    /// ImageDescription, where vendors (Aperio) mark their files.
    pub description: Option<&'a str>,
    pub coding: Coding,
    /// Every chunk points at the first one's data (as writers store blank tiles once).
    pub shared_chunks: bool,
}

/// JPEG quality of [`Compression::Jpeg`].
pub const JPEG_QUALITY: u8 = 90;

/// The grey level a [`Colour::Grey`] page stores for a colour.
pub fn luma([r, g, b]: [u8; 3]) -> u8 {
    (0.299 * f32::from(r) + 0.587 * f32::from(g) + 0.114 * f32::from(b)).round() as u8
}

/// JFIF's full-range BT.601 YCbCr of a colour.
pub fn ycbcr([r, g, b]: [u8; 3]) -> [u8; 3] {
    let (r, g, b) = (f32::from(r), f32::from(g), f32::from(b));
    [
        0.299 * r + 0.587 * g + 0.114 * b,
        128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b,
        128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b,
    ]
    .map(|v| v.round().clamp(0.0, 255.0) as u8)
}

impl<'a> Page<'a> {
    /// An uncompressed RGB page without description.
    pub fn new(
        width: u32,
        height: u32,
        chunks: Chunks,
        pixel: &'a (dyn Fn(u32, u32) -> [u8; 3] + Sync),
    ) -> Self {
        Page {
            width,
            height,
            chunks,
            pixel,
            description: None,
            coding: Coding::default(),
            shared_chunks: false,
        }
    }

    fn samples(&self) -> u32 {
        if self.coding.colour == Colour::Grey {
            1
        } else {
            3
        }
    }

    /// Each chunk's place in the image: (x, y, stored width, stored height).
    fn chunks(&self) -> Vec<(u32, u32, u32, u32)> {
        match self.chunks {
            Chunks::Tiles(tw, th) => {
                let mut tiles = Vec::new();
                for y in (0..self.height).step_by(th as usize) {
                    for x in (0..self.width).step_by(tw as usize) {
                        tiles.push((x, y, tw, th));
                    }
                }
                tiles
            }
            Chunks::Strips(rows) => (0..self.height)
                .step_by(rows as usize)
                .map(|y| (0, y, self.width, rows.min(self.height - y)))
                .collect(),
        }
    }

    /// A chunk's samples; tiles past the image's edge are padded with zeros, as TIFF stores
    /// them.
    fn chunk_samples(&self, chunk: (u32, u32, u32, u32)) -> Vec<u8> {
        self.samples_as(chunk, self.coding.colour)
    }

    /// What the JPEG encoder takes for a chunk: grey levels, else RGB (it converts to YCbCr).
    fn jpeg_input(&self, chunk: (u32, u32, u32, u32)) -> Vec<u8> {
        match self.coding.colour {
            Colour::Grey => self.samples_as(chunk, Colour::Grey),
            Colour::Rgb | Colour::YCbCr => self.samples_as(chunk, Colour::Rgb),
        }
    }

    fn samples_as(&self, (x0, y0, w, h): (u32, u32, u32, u32), colour: Colour) -> Vec<u8> {
        let mut bytes = Vec::with_capacity((w * h * 3) as usize);
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                let rgb = if x < self.width && y < self.height {
                    (self.pixel)(x, y)
                } else {
                    [0; 3]
                };
                match colour {
                    Colour::Rgb => bytes.extend(rgb),
                    Colour::YCbCr => bytes.extend(ycbcr(rgb)),
                    Colour::Grey => bytes.push(luma(rgb)),
                }
            }
        }
        bytes
    }

    /// A chunk as stored: its samples, compressed.
    fn chunk_bytes(&self, chunk: (u32, u32, u32, u32)) -> Vec<u8> {
        let mut out = Vec::new();
        match self.coding.compression {
            Compression::None => return self.chunk_samples(chunk),
            Compression::Lzw => Lzw.write_to(&mut out, &self.chunk_samples(chunk)).map(drop),
            Compression::Deflate => (Deflate::default())
                .write_to(&mut out, &self.chunk_samples(chunk))
                .map(drop),
            Compression::Jpeg { shared_tables } => {
                let stream = self.jpeg(chunk);
                return if shared_tables {
                    split_jpeg(&stream).1
                } else {
                    stream
                };
            }
        }
        .unwrap();
        out
    }

    /// The JPEGTables of a page whose chunks share them.
    fn jpeg_tables(&self) -> Option<Vec<u8>> {
        let Compression::Jpeg {
            shared_tables: true,
        } = self.coding.compression
        else {
            return None;
        };
        // The encoder's tables depend only on the quality: any chunk gives them.
        Some(split_jpeg(&self.jpeg((0, 0, 8, 8))).0)
    }

    /// A chunk as a whole JFIF stream.
    fn jpeg(&self, chunk: (u32, u32, u32, u32)) -> Vec<u8> {
        let (_, _, width, height) = chunk;
        let kind = match self.coding.colour {
            Colour::Grey => image::ExtendedColorType::L8,
            Colour::Rgb | Colour::YCbCr => image::ExtendedColorType::Rgb8,
        };
        let mut out = Vec::new();
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY);
        (encoder.write_image(&self.jpeg_input(chunk), width, height, kind)).unwrap();
        out
    }
}

/// A JPEG page's pixels as an ordinary JPEG decoder (the `image` crate's) gives them: each
/// chunk's stream decoded to RGB, clipped to the page.
pub fn jpeg_reference(page: &Page) -> image::RgbImage {
    let mut image = image::RgbImage::new(page.width, page.height);
    for chunk in page.chunks() {
        let (x0, y0, ..) = chunk;
        let decoded = image::load_from_memory(&page.jpeg(chunk))
            .unwrap()
            .to_rgb8();
        for (x, y, p) in decoded.enumerate_pixels() {
            if x0 + x < page.width && y0 + y < page.height {
                image.put_pixel(x0 + x, y0 + y, *p);
            }
        }
    }
    image
}

/// A JPEG stream cut into its tables (SOI, the DQT and DHT segments, EOI) and the abbreviated
/// stream without them.
fn split_jpeg(stream: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (mut tables, mut rest) = (vec![0xFF, 0xD8], vec![0xFF, 0xD8]);
    let mut at = 2;
    while stream[at + 1] != 0xDA {
        let len = usize::from(u16::from_be_bytes([stream[at + 2], stream[at + 3]]));
        let segment = &stream[at..at + 2 + len];
        if matches!(stream[at + 1], 0xDB | 0xC4) {
            tables.extend(segment);
        } else {
            rest.extend(segment);
        }
        at += 2 + len;
    }
    tables.extend([0xFF, 0xD9]);
    rest.extend(&stream[at..]);
    (tables, rest)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// BigTIFF (8-byte offsets) instead of classic TIFF.
    pub big: bool,
    /// Motorola byte order ("MM") instead of Intel ("II").
    pub big_endian: bool,
    /// Pages after the first are the first page's SubIFDs instead of the next in the chain.
    pub sub_ifds: bool,
}

impl Layout {
    /// `v`'s low `len` bytes in the file's byte order.
    fn put(&self, out: &mut Vec<u8>, v: u64, len: usize) {
        if self.big_endian {
            out.extend(&v.to_be_bytes()[8 - len..]);
        } else {
            out.extend(&v.to_le_bytes()[..len]);
        }
    }

    fn header(&self, first_ifd: u64) -> Vec<u8> {
        let mut header = if self.big_endian {
            b"MM".to_vec()
        } else {
            b"II".to_vec()
        };
        if self.big {
            for (v, len) in [(43, 2), (8, 2), (0, 2), (first_ifd, 8)] {
                self.put(&mut header, v, len);
            }
        } else {
            self.put(&mut header, 42, 2);
            self.put(&mut header, first_ifd, 4);
        }
        header
    }
}

const BYTE: u16 = 1;
const ASCII: u16 = 2;
const SHORT: u16 = 3;
const LONG: u16 = 4;
const UNDEFINED: u16 = 7;
const LONG8: u16 = 16;
const IFD: u16 = 13;
const IFD8: u16 = 18;

struct Entry {
    tag: u16,
    kind: u16,
    values: Vec<u64>,
}

fn entry(tag: u16, kind: u16, values: Vec<u64>) -> Entry {
    Entry { tag, kind, values }
}

fn size_of_kind(kind: u16) -> usize {
    match kind {
        BYTE | ASCII | UNDEFINED => 1,
        SHORT => 2,
        LONG | IFD => 4,
        _ => 8,
    }
}

/// Writes `pages` to `path`.
pub fn write_tiff(path: &Path, pages: &[Page], layout: Layout) -> std::io::Result<()> {
    let header_len = if layout.big { 16 } else { 8 };
    let chunks: Vec<Vec<(u32, u32, u32, u32)>> = pages.iter().map(|p| p.chunks()).collect();
    // The chunks whose data is written: the first alone when shared.
    let stored: Vec<&[(u32, u32, u32, u32)]> = (pages.iter().zip(&chunks))
        .map(|(page, chunks)| &chunks[..if page.shared_chunks { 1 } else { chunks.len() }])
        .collect();
    // Compressed chunks are encoded now, to know their sizes.
    let encoded: Vec<Option<Vec<Vec<u8>>>> = (pages.iter().zip(&stored))
        .map(|(page, chunks)| {
            (page.coding.compression != Compression::None)
                .then(|| chunks.par_iter().map(|&c| page.chunk_bytes(c)).collect())
        })
        .collect();
    let sizes: Vec<Vec<u64>> = (pages.iter().zip(&stored).zip(&encoded))
        .map(|((page, chunks), encoded)| match encoded {
            Some(data) => data.iter().map(|d| d.len() as u64).collect(),
            None => (chunks.iter())
                .map(|&(_, _, w, h)| u64::from(w * h * page.samples()))
                .collect(),
        })
        .collect();
    let counts: Vec<Vec<u64>> = (sizes.iter().zip(&chunks))
        .map(|(sizes, chunks)| (0..chunks.len()).map(|i| sizes[i % sizes.len()]).collect())
        .collect();
    // The IFD region's size does not depend on the offsets in it: measure it with zeros.
    let zeros: Vec<Vec<u64>> = chunks.iter().map(|c| vec![0; c.len()]).collect();
    let region = ifd_region(pages, &zeros, &counts, header_len, layout).len() as u64;
    let mut at = header_len + region;
    let offsets: Vec<Vec<u64>> = (sizes.iter().zip(&chunks))
        .map(|(sizes, chunks)| {
            let starts: Vec<u64> = (sizes.iter())
                .map(|s| {
                    let o = at;
                    at += s;
                    o
                })
                .collect();
            (0..chunks.len())
                .map(|i| starts[i % starts.len()])
                .collect()
        })
        .collect();
    let mut out = BufWriter::new(File::create(path)?);
    out.write_all(&layout.header(header_len))?;
    out.write_all(&ifd_region(pages, &offsets, &counts, header_len, layout))?;
    for ((page, page_chunks), encoded) in pages.iter().zip(stored).zip(encoded) {
        if let Some(data) = encoded {
            for bytes in data {
                out.write_all(&bytes)?;
            }
            continue;
        }
        // A row's worth of chunks at a time, generated in parallel.
        for group in page_chunks.chunks(64) {
            let data: Vec<Vec<u8>> = group.par_iter().map(|&c| page.chunk_bytes(c)).collect();
            for bytes in data {
                out.write_all(&bytes)?;
            }
        }
    }
    out.flush()
}

/// Every page's IFD, each followed by its out-of-line values, laid out from `start`.
fn ifd_region(
    pages: &[Page],
    offsets: &[Vec<u64>],
    counts: &[Vec<u64>],
    start: u64,
    layout: Layout,
) -> Vec<u8> {
    let entries = |i: usize, ifds: &[u64]| {
        let page = &pages[i];
        let offset_kind = if layout.big { LONG8 } else { LONG };
        let samples = page.samples();
        let photometric = match (page.coding.colour, page.coding.compression) {
            (Colour::Grey, _) => 1,
            (_, Compression::Jpeg { .. }) | (Colour::YCbCr, _) => 6,
            (Colour::Rgb, _) => 2,
        };
        let compression = match page.coding.compression {
            Compression::None => 1,
            Compression::Lzw => 5,
            Compression::Jpeg { .. } => 7,
            Compression::Deflate => 8,
        };
        let mut e = vec![
            entry(254, LONG, vec![u64::from(i > 0)]),
            entry(256, LONG, vec![u64::from(page.width)]),
            entry(257, LONG, vec![u64::from(page.height)]),
            entry(258, SHORT, vec![8; samples as usize]),
            entry(259, SHORT, vec![compression]),
            entry(262, SHORT, vec![photometric]),
            entry(277, SHORT, vec![u64::from(samples)]),
            entry(284, SHORT, vec![1]),
        ];
        if photometric == 6 {
            e.push(entry(530, SHORT, vec![1, 1]));
        }
        if let Some(tables) = page.jpeg_tables() {
            e.push(entry(
                347,
                UNDEFINED,
                tables.into_iter().map(u64::from).collect(),
            ));
        }
        match page.chunks {
            Chunks::Tiles(tw, th) => e.extend([
                entry(322, LONG, vec![u64::from(tw)]),
                entry(323, LONG, vec![u64::from(th)]),
                entry(324, offset_kind, offsets[i].clone()),
                entry(325, offset_kind, counts[i].clone()),
            ]),
            Chunks::Strips(rows) => e.extend([
                entry(273, offset_kind, offsets[i].clone()),
                entry(278, LONG, vec![u64::from(rows)]),
                entry(279, offset_kind, counts[i].clone()),
            ]),
        }
        if let Some(text) = page.description {
            let bytes = text.bytes().chain([0]).map(u64::from).collect();
            e.push(entry(270, ASCII, bytes));
        }
        if i == 0 && layout.sub_ifds && pages.len() > 1 {
            let kind = if layout.big { IFD8 } else { IFD };
            e.push(entry(330, kind, ifds[1..].to_vec()));
        }
        e.sort_by_key(|e| e.tag);
        e
    };
    // Where each IFD goes; their sizes do not depend on the offsets either.
    let mut ifds = vec![0; pages.len()];
    let mut at = start;
    for i in 0..pages.len() {
        ifds[i] = at;
        at += ifd_bytes(&entries(i, &ifds), at, 0, layout).len() as u64;
    }
    let mut region = Vec::new();
    for i in 0..pages.len() {
        let next = if !layout.sub_ifds && i + 1 < pages.len() {
            ifds[i + 1]
        } else {
            0
        };
        region.extend(ifd_bytes(&entries(i, &ifds), ifds[i], next, layout));
    }
    region
}

/// One IFD at `at` and the values that do not fit in its entries, after it.
fn ifd_bytes(entries: &[Entry], at: u64, next: u64, layout: Layout) -> Vec<u8> {
    let (count_len, entry_len, word) = if layout.big { (8, 20, 8) } else { (2, 12, 4) };
    let mut ifd = Vec::new();
    let mut extra = Vec::new();
    let extra_at = at + (count_len + entries.len() * entry_len + word) as u64;
    layout.put(&mut ifd, entries.len() as u64, count_len);
    for e in entries {
        let size = size_of_kind(e.kind);
        let mut data = Vec::new();
        for &v in &e.values {
            layout.put(&mut data, v, size);
        }
        layout.put(&mut ifd, u64::from(e.tag), 2);
        layout.put(&mut ifd, u64::from(e.kind), 2);
        layout.put(&mut ifd, e.values.len() as u64, word);
        if data.len() <= word {
            // Values that fit are left-justified in the entry, in either byte order.
            data.resize(word, 0);
            ifd.extend(data);
        } else {
            layout.put(&mut ifd, extra_at + extra.len() as u64, word);
            extra.extend(data);
            // Values start on word boundaries, as TIFF asks.
            extra.resize(extra.len().next_multiple_of(2), 0);
        }
    }
    layout.put(&mut ifd, next, word);
    ifd.extend(extra);
    ifd
}
