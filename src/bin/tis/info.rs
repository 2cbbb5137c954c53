//! `tis info`: what a bundle holds.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

#[derive(Args)]
pub struct InfoArgs {
    /// Model bundle (.safetensors); the embedded default when left out.
    model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &InfoArgs) -> tis::Result<()> {
    let model = crate::load_model(args.model.as_ref())?;
    let info = &model.info;
    let config = &info.configuration;
    let net = &config.network;
    let report = json!({
        "origin": info.origin,
        "source": info.metadata.get("source"),
        "format": info.metadata.get("format"),
        "configuration": config.name,
        "classes": info.dataset.class_names,
        "channels": info.dataset.channel_names,
        "patch_size": config.patch_size,
        "spacing": config.spacing,
        "mirror_axes": info.mirror_axes,
        "network": {
            "features_per_stage": net.features,
            "kernel_sizes": net.kernel_sizes,
            "strides": net.strides,
            "parameters": info.network_parameters,
        },
        "tis_head": info.tis_config.as_ref().map(|c| json!({
            "config": c,
            "parameters": info.head_parameters,
        })),
        "stored_dtypes": info.stored_dtypes,
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("JSON values")
        );
        return Ok(());
    }
    println!("model        {}", info.origin);
    if let Some(source) = info.metadata.get("source") {
        println!("source       {source}");
    }
    println!(
        "classes      {}",
        info.dataset
            .class_names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{i} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("channels     {}", info.dataset.channel_names.join(", "));
    println!(
        "config       {} patch {:?} spacing {:?} mm, mirror axes {:?}",
        config.name, config.patch_size, config.spacing, info.mirror_axes
    );
    println!(
        "network      PlainConvUNet, features {:?}, {} parameters",
        net.features, info.network_parameters
    );
    match &info.tis_config {
        Some(c) => println!(
            "tis head     d {} heads {} ffn {} layers {}, pe grid {:?}, roi min {:?} max {:?}, {} parameters",
            c.d_model,
            c.n_heads,
            c.ffn_dim,
            c.n_layers,
            c.pe_grid,
            c.roi_min,
            c.roi_max,
            info.head_parameters
        ),
        None => println!("tis head     none (automatic segmentation only)"),
    }
    println!(
        "dtypes       {}",
        info.stored_dtypes
            .iter()
            .map(|(d, n)| format!("{n} × {d}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
