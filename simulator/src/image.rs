//! The images the simulator draws: small (long side 64 px), valid PNGs of the requested
//! aspect ratio, whose pixels derive from the prompt so different prompts give different
//! images. Nothing is cached: drawing one takes microseconds.
use std::hash::{Hash, Hasher};

/// Long side of every image, in pixels.
pub const LONG_SIDE: u32 = 64;

/// Width and height for `"W:H"`; square when absent or unparsable.
pub fn dimensions(aspect_ratio: Option<&str>) -> (u32, u32) {
    let parsed = aspect_ratio
        .and_then(|r| r.split_once(':'))
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)))
        .filter(|(w, h)| *w > 0 && *h > 0);
    let Some((w, h)) = parsed else {
        return (LONG_SIDE, LONG_SIDE);
    };
    let short = |a: u32, b: u32| {
        ((u64::from(LONG_SIDE) * u64::from(a) + u64::from(b) / 2) / u64::from(b)).max(1) as u32
    };
    if w >= h {
        (LONG_SIDE, short(h, w))
    } else {
        (short(w, h), LONG_SIDE)
    }
}

/// A PNG for `prompt` at `aspect_ratio`.
pub fn render(prompt: &str, aspect_ratio: Option<&str>) -> Vec<u8> {
    let (width, height) = dimensions(aspect_ratio);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    prompt.hash(&mut hasher);
    let seed = hasher.finish();
    let byte = |i: u32| ((seed >> (i * 8)) & 0xff) as u8;
    let (from, to) = ([byte(0), byte(1), byte(2)], [byte(3), byte(4), byte(5)]);
    let stripe = u32::from(byte(6) % 7) + 3;
    let mut pixels = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let t = (x + y) * 255 / (width + height).max(1);
            let band = ((x / stripe) + (y / stripe)) % 2 == 0;
            for c in 0..3 {
                let a = u32::from(from[c]);
                let b = u32::from(to[c]);
                let mut v = (a * (255 - t) + b * t) / 255;
                if band {
                    v = 255 - v / 2;
                }
                pixels.push(v as u8);
            }
        }
    }
    encode(width, height, &pixels)
}

fn encode(width: u32, height: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pixels.len() / 2 + 128);
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    // Writing to a Vec with dimensions that match the buffer cannot fail.
    let written = encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(pixels).and_then(|()| w.finish()));
    if written.is_err() {
        return Vec::new();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size().expect("size")];
        let info = reader.next_frame(&mut buf).expect("png frame");
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    #[test]
    fn decodable_with_the_requested_aspect_ratio() {
        for (ratio, want) in [
            ("16:9", (64, 36)),
            ("9:16", (36, 64)),
            ("1:1", (64, 64)),
            ("21:9", (64, 27)),
            ("1:8", (8, 64)),
        ] {
            let (w, h, _) = decode(&render("a lighthouse", Some(ratio)));
            assert_eq!((w, h), want, "{ratio}");
        }
        assert_eq!(dimensions(None), (64, 64));
        assert_eq!(dimensions(Some("0:3")), (64, 64));
    }

    #[test]
    fn differs_by_prompt() {
        let a = decode(&render("a lighthouse", Some("16:9"))).2;
        let b = decode(&render("a harbour", Some("16:9"))).2;
        assert_ne!(a, b);
        assert_eq!(a, decode(&render("a lighthouse", Some("16:9"))).2);
    }
}
