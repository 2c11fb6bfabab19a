//! A small TIFF writer for the tests and bench of `slam tile`: uncompressed 8-bit RGB pages,
//! tiled or stripped, classic TIFF or BigTIFF, the pages after the first chained as
//! reduced-resolution pages or hung under the first as SubIFDs. The IFDs come first, then the
//! pixel data, generated chunk by chunk from a function (a large slide takes little memory).
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;

/// How a page's pixels are cut.
#[derive(Clone, Copy, Debug)]
pub enum Chunks {
    /// Tiles of width x height.
    Tiles(u32, u32),
    /// Strips of this many rows.
    Strips(u32),
}

pub struct Page<'a> {
    pub width: u32,
    pub height: u32,
    pub chunks: Chunks,
    pub pixel: &'a (dyn Fn(u32, u32) -> [u8; 3] + Sync),
    /// ImageDescription, where vendors (Aperio) mark their files.
    pub description: Option<&'a str>,
}

impl Page<'_> {
    /// Each chunk's place in the image: (x, y, stored width, stored height, rows with data).
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

    /// A chunk's bytes; tiles past the image's edge are padded with zeros, as TIFF stores them.
    fn chunk_bytes(&self, (x0, y0, w, h): (u32, u32, u32, u32)) -> Vec<u8> {
        let mut bytes = Vec::with_capacity((w * h * 3) as usize);
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                if x < self.width && y < self.height {
                    bytes.extend((self.pixel)(x, y));
                } else {
                    bytes.extend([0; 3]);
                }
            }
        }
        bytes
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Layout {
    /// BigTIFF (8-byte offsets) instead of classic TIFF.
    pub big: bool,
    /// Pages after the first are the first page's SubIFDs instead of the next in the chain.
    pub sub_ifds: bool,
}

const ASCII: u16 = 2;
const SHORT: u16 = 3;
const LONG: u16 = 4;
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
        ASCII => 1,
        SHORT => 2,
        LONG | IFD => 4,
        _ => 8,
    }
}

/// Writes `pages` to `path`.
pub fn write_tiff(path: &Path, pages: &[Page], layout: Layout) -> std::io::Result<()> {
    let header_len = if layout.big { 16 } else { 8 };
    let chunks: Vec<Vec<(u32, u32, u32, u32)>> = pages.iter().map(|p| p.chunks()).collect();
    // The IFD region's size does not depend on the offsets in it: measure it with zeros.
    let zeros: Vec<Vec<u64>> = chunks.iter().map(|c| vec![0; c.len()]).collect();
    let region = ifd_region(pages, &zeros, &zeros, header_len, layout).len() as u64;
    let mut offsets = Vec::new();
    let mut counts = Vec::new();
    let mut at = header_len + region;
    for page in &chunks {
        let sizes: Vec<u64> = page
            .iter()
            .map(|&(_, _, w, h)| u64::from(w * h * 3))
            .collect();
        offsets.push(
            sizes
                .iter()
                .map(|s| {
                    let o = at;
                    at += s;
                    o
                })
                .collect(),
        );
        counts.push(sizes);
    }
    let mut out = BufWriter::new(File::create(path)?);
    if layout.big {
        out.write_all(b"II")?;
        out.write_all(&43u16.to_le_bytes())?;
        out.write_all(&8u16.to_le_bytes())?;
        out.write_all(&0u16.to_le_bytes())?;
        out.write_all(&header_len.to_le_bytes())?;
    } else {
        out.write_all(b"II")?;
        out.write_all(&42u16.to_le_bytes())?;
        out.write_all(&(header_len as u32).to_le_bytes())?;
    }
    out.write_all(&ifd_region(pages, &offsets, &counts, header_len, layout))?;
    for (page, page_chunks) in pages.iter().zip(&chunks) {
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
        let mut e = vec![
            entry(254, LONG, vec![u64::from(i > 0)]),
            entry(256, LONG, vec![u64::from(page.width)]),
            entry(257, LONG, vec![u64::from(page.height)]),
            entry(258, SHORT, vec![8, 8, 8]),
            entry(259, SHORT, vec![1]),
            entry(262, SHORT, vec![2]),
            entry(277, SHORT, vec![3]),
            entry(284, SHORT, vec![1]),
        ];
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
        at += ifd_bytes(&entries(i, &ifds), at, 0, layout.big).len() as u64;
    }
    let mut region = Vec::new();
    for i in 0..pages.len() {
        let next = if !layout.sub_ifds && i + 1 < pages.len() {
            ifds[i + 1]
        } else {
            0
        };
        region.extend(ifd_bytes(&entries(i, &ifds), ifds[i], next, layout.big));
    }
    region
}

/// One IFD at `at` and the values that do not fit in its entries, after it.
fn ifd_bytes(entries: &[Entry], at: u64, next: u64, big: bool) -> Vec<u8> {
    let (count_len, entry_len, word) = if big { (8, 20, 8) } else { (2, 12, 4) };
    let mut ifd = Vec::new();
    let mut extra = Vec::new();
    let extra_at = at + (count_len + entries.len() * entry_len + word) as u64;
    let put = |out: &mut Vec<u8>, v: u64, len: usize| out.extend(&v.to_le_bytes()[..len]);
    put(&mut ifd, entries.len() as u64, count_len);
    for e in entries {
        let size = size_of_kind(e.kind);
        let mut data = Vec::new();
        for &v in &e.values {
            put(&mut data, v, size);
        }
        put(&mut ifd, u64::from(e.tag), 2);
        put(&mut ifd, u64::from(e.kind), 2);
        put(&mut ifd, e.values.len() as u64, word);
        if data.len() <= word {
            data.resize(word, 0);
            ifd.extend(data);
        } else {
            put(&mut ifd, extra_at + extra.len() as u64, word);
            extra.extend(data);
            // Values start on word boundaries, as TIFF asks.
            extra.resize(extra.len().next_multiple_of(2), 0);
        }
    }
    put(&mut ifd, next, word);
    ifd.extend(extra);
    ifd
}
