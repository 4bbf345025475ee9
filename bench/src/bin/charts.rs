//! `charts`: PNG bar charts from the results file that `bench/run.sh` writes.
//!
//! `charts RESULTS.tsv OUT_DIR` reads rows of `measure<TAB>path<TAB>value`
//! (a header row first) and writes `throughput.png`, `latency.png`,
//! `cpu.png` and `memory.png` into OUT_DIR: one group of bars per path, in the order the
//! paths first appear in the file.
//!
//! Text needs a TTF file, read at run time: `BENCH_FONT` if set, else DejaVu
//! Sans (Debian's `fonts-dejavu-core`, which run.sh installs if missing).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::error::Error;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 540;
const FONT: &str = "sans-serif";
const FONT_FILES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
const PALETTE: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// One chart: a group of bars per path, one bar per series.
struct Chart<'a> {
    file: &'a str,
    title: &'a str,
    y_label: &'a str,
    /// (measure in the results file, legend text).
    series: &'a [(&'a str, &'a str)],
    /// A measure shown as a second line under each path's name.
    note: Option<(&'a str, &'a str)>,
    /// A horizontal line across the chart: (value, label).
    target: Option<(f64, &'a str)>,
}

/// The results file: each path in file order, and every value by
/// (measure, path).
struct Results {
    paths: Vec<String>,
    values: HashMap<(String, String), f64>,
}

impl Results {
    fn read(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("reading {}: {e}", file.display()))?;
        let mut results = Results {
            paths: Vec::new(),
            values: HashMap::new(),
        };
        for (n, line) in text.lines().enumerate().skip(1) {
            let fields: Vec<&str> = line.split('\t').collect();
            let [measure, path, value] = fields[..] else {
                return Err(format!("{}:{}: expected 3 fields", file.display(), n + 1).into());
            };
            let value: f64 = value
                .parse()
                .map_err(|e| format!("{}:{}: {value:?}: {e}", file.display(), n + 1))?;
            if !results.paths.iter().any(|p| p == path) {
                results.paths.push(path.to_string());
            }
            results
                .values
                .insert((measure.to_string(), path.to_string()), value);
        }
        Ok(results)
    }

    fn get(&self, measure: &str, path: &str) -> Option<f64> {
        self.values
            .get(&(measure.to_string(), path.to_string()))
            .copied()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [results, out] = &args[..] else {
        eprintln!("usage: charts RESULTS.tsv OUT_DIR");
        std::process::exit(64);
    };
    if let Err(e) = run(Path::new(results), Path::new(out)) {
        eprintln!("charts: {e}");
        std::process::exit(1);
    }
}

fn run(results: &Path, out: &Path) -> Result<()> {
    load_font()?;
    let results = Results::read(results)?;
    std::fs::create_dir_all(out)?;
    let charts = [
        Chart {
            file: "throughput.png",
            title: "Echo throughput, 100 connections",
            y_label: "round trips per second",
            series: &[("echo_64_per_sec", "64 B"), ("echo_4k_per_sec", "4 KiB")],
            note: None,
            target: None,
        },
        Chart {
            file: "latency.png",
            title: "Round-trip latency at a fixed rate (64 B, 100 connections)",
            y_label: "microseconds",
            series: &[
                ("latency_p50_us", "p50"),
                ("latency_p99_us", "p99"),
                ("latency_p999_us", "p99.9"),
            ],
            note: Some(("latency_achieved_per_sec", "msg/s")),
            target: None,
        },
        Chart {
            file: "cpu.png",
            title: "Proxy CPU per echoed message at a fixed rate",
            y_label: "microseconds",
            series: &[("cpu_us_per_message", "user + system")],
            note: None,
            target: None,
        },
        Chart {
            file: "memory.png",
            title: "Proxy RSS per idle session",
            y_label: "bytes",
            series: &[("idle_bytes_per_session", "RSS growth / sessions")],
            note: Some(("idle_sessions", "sessions")),
            target: Some((4096.0, "4 KiB target (multiplexed)")),
        },
    ];
    for chart in &charts {
        draw(&results, chart, &out.join(chart.file))?;
    }
    Ok(())
}

/// Registers the TTF that plotters' ab_glyph backend draws every text with.
fn load_font() -> Result<()> {
    let candidates: Vec<String> = match std::env::var("BENCH_FONT") {
        Ok(file) => vec![file],
        Err(_) => FONT_FILES.iter().map(|f| f.to_string()).collect(),
    };
    let Some(bytes) = candidates.iter().find_map(|f| std::fs::read(f).ok()) else {
        return Err(format!(
            "no font among {candidates:?}: install fonts-dejavu-core or set BENCH_FONT"
        )
        .into());
    };
    // plotters keeps the font for the life of the process.
    register_font(FONT, FontStyle::Normal, Vec::leak(bytes))
        .map_err(|_| "the font file is not a valid TTF")?;
    Ok(())
}

fn draw(results: &Results, chart: &Chart, file: &Path) -> Result<()> {
    let paths: Vec<&String> = results
        .paths
        .iter()
        .filter(|p| {
            chart
                .series
                .iter()
                .any(|(m, _)| results.get(m, p).is_some())
        })
        .collect();
    if paths.is_empty() {
        return Err(format!("no values for {}", chart.file).into());
    }
    let top = paths
        .iter()
        .flat_map(|p| chart.series.iter().filter_map(|(m, _)| results.get(m, p)))
        .chain(chart.target.map(|(v, _)| v))
        .fold(1.0_f64, f64::max)
        * 1.3;

    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut ctx = ChartBuilder::on(&root)
            .caption(chart.title, (FONT, 24))
            .margin(16)
            .x_label_area_size(52)
            .y_label_area_size(80)
            .build_cartesian_2d(-0.5..paths.len() as f64 - 0.5, 0.0..top)?;
        ctx.configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .light_line_style(WHITE)
            .y_desc(chart.y_label)
            .y_label_formatter(&|v| thousands(*v))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .draw()?;

        let width = 0.8 / chart.series.len() as f64;
        for (s, (measure, legend)) in chart.series.iter().enumerate() {
            let color = PALETTE[s % PALETTE.len()];
            let bars = paths.iter().enumerate().filter_map(|(i, p)| {
                let v = results.get(measure, p)?;
                let x0 = i as f64 - 0.4 + s as f64 * width;
                Some((x0, v))
            });
            ctx.draw_series(bars.clone().map(|(x0, v)| {
                Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], color.filled())
            }))?
            .label(*legend)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
            let value_style = TextStyle::from((FONT, 14))
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            ctx.draw_series(bars.map(|(x0, v)| {
                Text::new(thousands(v), (x0 + width * 0.46, v), value_style.clone())
            }))?;
        }
        if let Some((value, label)) = chart.target {
            let red = RGBColor(200, 30, 30);
            let line = [(-0.5, value), (paths.len() as f64 - 0.5, value)];
            ctx.draw_series([PathElement::new(line, red.stroke_width(2))])?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], red.stroke_width(2)));
        }
        ctx.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;

        // Path names (and the note line) under each group, drawn on the
        // root area at the pixel positions of the group centres.
        let name_style = TextStyle::from((FONT, 16))
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let note_style = TextStyle::from((FONT, 13))
            .color(&RGBColor(90, 90, 90))
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, p) in paths.iter().enumerate() {
            let (x, y) = ctx.backend_coord(&(i as f64, 0.0));
            root.draw(&Text::new(p.as_str(), (x, y + 8), name_style.clone()))?;
            if let Some((measure, unit)) = chart.note {
                if let Some(v) = results.get(measure, p) {
                    let note = format!("{} {unit}", thousands(v));
                    root.draw(&Text::new(note, (x, y + 28), note_style.clone()))?;
                }
            }
        }
        root.present()?;
    }
    write_png(file, &pixels)
}

fn write_png(file: &Path, rgb: &[u8]) -> Result<()> {
    let out = std::io::BufWriter::new(
        std::fs::File::create(file).map_err(|e| format!("creating {}: {e}", file.display()))?,
    );
    let mut encoder = png::Encoder::new(out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(rgb)?;
    Ok(())
}

/// `12345.6` as `12,346`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
