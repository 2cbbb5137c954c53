//! `tis refine` (clicks from a file, one refinement, the result written) and `tis session`
//! (the JSON-lines protocol of docs/session-protocol.md for viewers).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::{Value, json};
use tis::backend::Backend;
use tis::io::clicks::read_clicks;
use tis::io::nifti::{Image, write_labels};
use tis::io::protocol::{Command, Request, parse_request, request_id};
use tis::pipeline::image_session::ImageSession;
use tis::{Error, Model, Region, SessionOptions};

use crate::Device;
use crate::segment::read_channels;

/// What both commands need to open a session on an image.
#[derive(Args)]
pub struct SessionInput {
    /// The image, one NIfTI file per input channel.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Model bundle with a TIS head; the embedded default when left out.
    #[arg(short, long)]
    model: Option<PathBuf>,
    /// Turn test-time mirroring off.
    #[arg(long)]
    no_mirror: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
}

#[derive(Args)]
pub struct RefineArgs {
    #[command(flatten)]
    input: SessionInput,
    /// JSON file of clicks: [{"z", "y", "x", "class"}] in image voxel indices, class by name or
    /// number.
    #[arg(long)]
    clicks: PathBuf,
    /// Where to write the refined segmentation.
    #[arg(short, long)]
    output: PathBuf,
    /// Print a JSON report instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SessionArgs {
    #[command(flatten)]
    input: SessionInput,
}

fn box_json(region: Option<Region>) -> Value {
    region.map_or(Value::Null, |r| json!({"start": r.start, "size": r.size}))
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The model (with a TIS head) and the image, read.
fn open<B: Backend + Clone>(
    backend: B,
    input: &SessionInput,
) -> tis::Result<(Model<B>, tis::Tensor, Image)> {
    let model = crate::load_model_on(input.model.as_ref(), backend)?;
    if model.head.is_none() {
        return Err(Error::Session(format!(
            "model {} has no TIS head: it cannot refine",
            model.info.origin
        )));
    }
    let (volume, image) = read_channels(&input.images)?;
    Ok((model, volume, image))
}

/// A session on the image (the automatic segmentation and the encoder's features), and the
/// milliseconds its encoding took.
fn encode<'m, B: Backend + Clone>(
    model: &'m Model<B>,
    volume: &tis::Tensor,
    image: &Image,
    input: &SessionInput,
) -> tis::Result<(ImageSession<'m, B>, f64)> {
    let started = Instant::now();
    let options = SessionOptions {
        mirror: !input.no_mirror,
        ..Default::default()
    };
    let session = ImageSession::new(model, volume, image.spacing, &options, &mut |_, _| {})?;
    Ok((session, ms(started)))
}

pub fn refine(args: &RefineArgs) -> tis::Result<()> {
    crate::on_device!(args.input.device, refine_on, args)
}

fn refine_on<B: Backend + Clone>(backend: B, args: &RefineArgs) -> tis::Result<()> {
    let (model, volume, image) = open(backend, &args.input)?;
    let clicks = read_clicks(&args.clicks, &model.info.dataset.class_names)?;
    let (mut session, encode_ms) = encode(&model, &volume, &image, &args.input)?;
    let started = Instant::now();
    let r = session.refine(&clicks)?;
    let refine_ms = ms(started);
    write_labels(
        &args.output,
        &session.labels(),
        image.shape(),
        &image.header,
    )?;
    if args.json {
        let report = json!({
            "output": args.output,
            "clicks": clicks.len(),
            "clicks_used": r.clicks_used,
            "clicks_outside_roi": r.clicks_outside_roi,
            "roi": box_json(Some(r.roi)),
            "changed": box_json(r.changed),
            "encode_ms": encode_ms,
            "refine_ms": refine_ms,
        });
        println!("{report}");
    } else {
        println!(
            "refined with {} click(s) ({} in the ROI at {:?} of {:?}) in {refine_ms:.1} ms after {encode_ms:.0} ms of encoding → {}",
            clicks.len(),
            r.clicks_used,
            r.roi.start,
            r.roi.size,
            args.output.display()
        );
    }
    Ok(())
}

/// One request of the session protocol, carried out and answered as a JSON object (without
/// `id`); `quit` is set by the quit command.
fn answer<B: Backend>(
    session: &mut ImageSession<'_, B>,
    image: &Image,
    request: &Request,
    quit: &mut bool,
) -> tis::Result<Value> {
    let started = Instant::now();
    let clicks_now = |s: &ImageSession<'_, B>| s.grid_session().clicks().len();
    let mut reply = match &request.command {
        Command::Refine(clicks) => {
            let r = session.refine(clicks)?;
            json!({
                "changed": box_json(r.changed),
                "roi": box_json(Some(r.roi)),
                "clicks_used": r.clicks_used,
                "clicks_outside_roi": r.clicks_outside_roi,
                "clicks": clicks_now(session),
            })
        }
        Command::Undo => {
            let changed = session.undo()?;
            json!({"changed": box_json(changed), "clicks": clicks_now(session)})
        }
        Command::Reset => {
            let changed = session.reset();
            json!({"changed": box_json(changed), "clicks": 0})
        }
        Command::Save(path) => {
            write_labels(
                Path::new(path),
                &session.labels(),
                image.shape(),
                &image.header,
            )?;
            json!({"path": path})
        }
        Command::Stats => {
            let mut counts = vec![0usize; session.class_names().len()];
            session
                .labels()
                .iter()
                .for_each(|&l| counts[l as usize] += 1);
            json!({"clicks": clicks_now(session), "voxels_per_class": counts})
        }
        Command::Quit => {
            *quit = true;
            json!({})
        }
    };
    let map = reply.as_object_mut().expect("replies are objects");
    map.insert("ok".into(), true.into());
    map.insert("cmd".into(), request.cmd.clone().into());
    map.insert("latency_ms".into(), ms(started).into());
    Ok(reply)
}

pub fn session(args: &SessionArgs) -> tis::Result<()> {
    crate::on_device!(args.input.device, session_on, args)
}

fn session_on<B: Backend + Clone>(backend: B, args: &SessionArgs) -> tis::Result<()> {
    let (model, volume, image) = open(backend, &args.input)?;
    let (mut session, encode_ms) = encode(&model, &volume, &image, &args.input)?;
    {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let say = |out: &mut std::io::StdoutLock<'_>, value: Value| -> tis::Result<()> {
            writeln!(out, "{value}")
                .and_then(|()| out.flush())
                .map_err(|e| Error::io("stdout", e))
        };
        say(
            &mut out,
            json!({
                "ok": true,
                "event": "ready",
                "image_shape": session.image_shape(),
                "grid": session.preprocessed().grid(),
                "classes": model.info.dataset.class_names,
                "encode_ms": encode_ms,
            }),
        )?;
        let mut quit = false;
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| Error::io("stdin", e))?;
            if line.trim().is_empty() {
                continue;
            }
            let id = request_id(&line);
            let mut reply = parse_request(&line, &model.info.dataset.class_names)
                .and_then(|request| answer(&mut session, &image, &request, &mut quit))
                .unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}));
            if let Some(id) = id {
                reply
                    .as_object_mut()
                    .expect("replies are objects")
                    .insert("id".into(), id);
            }
            say(&mut out, reply)?;
            if quit {
                break;
            }
        }
        Ok(())
    }
}
