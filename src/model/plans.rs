//! What the engine reads from nnU-Net's plans.json and dataset.json: the network of a
//! configuration (PlainConvUNet), its patch size, spacing and axis order, and the classes.
//! Both the current `architecture` form and the older v2 field names are understood.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A step of the network's forward pass (for per-step timings and FLOP counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkStep {
    /// The conv blocks of encoder stage s (0: full resolution).
    Encoder(usize),
    /// The transposed convolution into decoder stage j (0: the coarsest).
    Upsample(usize),
    /// The conv blocks of decoder stage j, over [upsampled; skip].
    Decoder(usize),
    /// The 1×1×1 convolution to the class logits.
    SegLayer,
}

impl std::fmt::Display for NetworkStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetworkStep::Encoder(s) => write!(f, "encoder {s}"),
            NetworkStep::Upsample(j) => write!(f, "upsample {j}"),
            NetworkStep::Decoder(j) => write!(f, "decoder {j}"),
            NetworkStep::SegLayer => write!(f, "seg layer"),
        }
    }
}

/// The PlainConvUNet of a configuration, as `dynamic_network_architectures` builds it.
#[derive(Clone, Debug, PartialEq)]
pub struct NetworkPlan {
    pub in_channels: usize,
    pub classes: usize,
    pub features: Vec<usize>,
    pub kernel_sizes: Vec<[usize; 3]>,
    pub strides: Vec<[usize; 3]>,
    pub convs_per_stage: Vec<usize>,
    /// One entry per decoder stage, lowest resolution first (`n_conv_per_stage_decoder`).
    pub convs_per_decoder_stage: Vec<usize>,
    pub conv_bias: bool,
    pub norm_eps: f32,
    pub negative_slope: f32,
}

/// One configuration of the plans (e.g. `3d_fullres`), inheritance resolved.
#[derive(Clone, Debug)]
pub struct ConfigurationPlan {
    pub name: String,
    pub patch_size: [usize; 3],
    /// Target spacing in mm, in the transposed axis order.
    pub spacing: [f64; 3],
    pub transpose_forward: [usize; 3],
    pub network: NetworkPlan,
    /// The resolved configuration, for the preprocessing fields.
    pub raw: Map<String, Value>,
}

/// The classes and input channels of dataset.json.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetInfo {
    pub channel_names: Vec<String>,
    /// Class names by label value 0..K.
    pub class_names: Vec<String>,
}

fn plans_err(message: impl Into<String>) -> Error {
    Error::Plans(message.into())
}

fn field<'a>(obj: &'a Map<String, Value>, key: &str, what: &str) -> Result<&'a Value> {
    obj.get(key)
        .ok_or_else(|| plans_err(format!("{what} has no field `{key}`")))
}

fn as_usize(v: &Value, what: &str) -> Result<usize> {
    v.as_u64().map(|n| n as usize).ok_or_else(|| {
        plans_err(format!(
            "`{what}` must be a non-negative integer, found {v}"
        ))
    })
}

fn as_f64(v: &Value, what: &str) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| plans_err(format!("`{what}` must be a number, found {v}")))
}

fn triple<T: Copy + Default>(
    v: &Value,
    what: &str,
    item: impl Fn(&Value, &str) -> Result<T>,
) -> Result<[T; 3]> {
    match v.as_array() {
        Some(items) if items.len() == 3 => {
            let mut out = [T::default(); 3];
            for (o, i) in out.iter_mut().zip(items) {
                *o = item(i, what)?;
            }
            Ok(out)
        }
        _ => Err(plans_err(format!(
            "`{what}` must list three values (a 3D configuration), found {v}"
        ))),
    }
}

/// A per-stage list that `dynamic_network_architectures` also accepts as one scalar.
fn per_stage<T: Clone>(
    v: &Value,
    stages: usize,
    what: &str,
    item: impl Fn(&Value, &str) -> Result<T>,
) -> Result<Vec<T>> {
    let list = match v.as_array() {
        Some(items) => items
            .iter()
            .map(|i| item(i, what))
            .collect::<Result<Vec<_>>>()?,
        None => vec![item(v, what)?; stages],
    };
    if list.len() != stages {
        return Err(plans_err(format!(
            "`{what}` has {} entries, expected {stages}",
            list.len()
        )));
    }
    Ok(list)
}

/// `plans.configurations[name]` with `inherits_from` resolved as nnU-Net does (the child's
/// top-level keys override the parent's).
fn resolve_configuration(
    plans: &Value,
    name: &str,
    visited: &mut Vec<String>,
) -> Result<Map<String, Value>> {
    let configurations = plans
        .get("configurations")
        .and_then(Value::as_object)
        .ok_or_else(|| plans_err("plans have no `configurations` object"))?;
    let own = configurations
        .get(name)
        .and_then(Value::as_object)
        .ok_or_else(|| {
            plans_err(format!(
                "configuration `{name}` not in plans (have: {})",
                configurations
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
    if visited.iter().any(|v| v == name) {
        return Err(plans_err(format!(
            "configurations inherit in a circle: {} → {name}",
            visited.join(" → ")
        )));
    }
    visited.push(name.to_string());
    let mut resolved = match own.get("inherits_from").and_then(Value::as_str) {
        Some(parent) => resolve_configuration(plans, parent, visited)?,
        None => Map::new(),
    };
    resolved.extend(own.clone());
    Ok(resolved)
}

/// The `architecture` entry of a configuration; older v2 plans are converted exactly as
/// nnU-Net's `ConfigurationManager` does.
fn architecture(config: &Map<String, Value>) -> Result<Map<String, Value>> {
    if let Some(arch) = config.get("architecture") {
        return arch
            .as_object()
            .cloned()
            .ok_or_else(|| plans_err("`architecture` must be an object"));
    }
    let what = "configuration (old plans without `architecture`)";
    let class = field(config, "UNet_class_name", what)?;
    if class.as_str() != Some("PlainConvUNet") {
        return Err(plans_err(format!(
            "network class {class} is not supported (only PlainConvUNet)"
        )));
    }
    let encoder_convs = field(config, "n_conv_per_stage_encoder", what)?;
    let stages = encoder_convs
        .as_array()
        .map(Vec::len)
        .ok_or_else(|| plans_err("`n_conv_per_stage_encoder` must be a list"))?;
    let base = as_usize(
        field(config, "UNet_base_num_features", what)?,
        "UNet_base_num_features",
    )?;
    let max = as_usize(
        field(config, "unet_max_num_features", what)?,
        "unet_max_num_features",
    )?;
    let features: Vec<Value> = (0..stages)
        .map(|i| Value::from((base << i).min(max)))
        .collect();
    let kwargs = serde_json::json!({
        "n_stages": stages,
        "features_per_stage": features,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": field(config, "conv_kernel_sizes", what)?,
        "strides": field(config, "pool_op_kernel_sizes", what)?,
        "n_conv_per_stage": encoder_convs,
        "n_conv_per_stage_decoder": field(config, "n_conv_per_stage_decoder", what)?,
        "conv_bias": true,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": true},
        "dropout_op": null,
        "nonlin": "torch.nn.LeakyReLU",
    });
    let mut arch = Map::new();
    arch.insert(
        "network_class_name".into(),
        "dynamic_network_architectures.architectures.unet.PlainConvUNet".into(),
    );
    arch.insert("arch_kwargs".into(), kwargs);
    Ok(arch)
}

fn class_is(v: Option<&Value>, suffix: &str) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| s.rsplit('.').next() == Some(suffix))
}

fn network_plan(
    arch: &Map<String, Value>,
    in_channels: usize,
    classes: usize,
) -> Result<NetworkPlan> {
    let class = arch
        .get("network_class_name")
        .and_then(Value::as_str)
        .unwrap_or("(missing)");
    if class.rsplit('.').next() != Some("PlainConvUNet") {
        return Err(plans_err(format!(
            "network class `{class}` is not supported yet (only PlainConvUNet)"
        )));
    }
    let kw = field(arch, "arch_kwargs", "architecture")?
        .as_object()
        .ok_or_else(|| plans_err("`arch_kwargs` must be an object"))?;
    let what = "arch_kwargs";
    for (key, expected) in [
        ("conv_op", "Conv3d"),
        ("norm_op", "InstanceNorm3d"),
        ("nonlin", "LeakyReLU"),
    ] {
        if !class_is(kw.get(key), expected) {
            return Err(plans_err(format!(
                "`{key}` is {}, only {expected} is supported",
                kw.get(key).map_or("missing".to_string(), Value::to_string)
            )));
        }
    }
    if kw.get("dropout_op").is_some_and(|d| !d.is_null()) {
        return Err(plans_err("dropout layers are not supported"));
    }
    if kw.get("nonlin_first").and_then(Value::as_bool) == Some(true) {
        return Err(plans_err("`nonlin_first: true` is not supported"));
    }
    let stages = as_usize(field(kw, "n_stages", what)?, "n_stages")?;
    if stages < 2 {
        return Err(plans_err(format!(
            "a U-Net needs at least 2 stages, plans have {stages}"
        )));
    }
    let norm_kwargs = kw.get("norm_op_kwargs").and_then(Value::as_object);
    if norm_kwargs
        .and_then(|k| k.get("affine"))
        .and_then(Value::as_bool)
        == Some(false)
    {
        return Err(plans_err(
            "InstanceNorm without affine parameters is not supported",
        ));
    }
    let norm_eps = match norm_kwargs.and_then(|k| k.get("eps")) {
        Some(v) => as_f64(v, "norm_op_kwargs.eps")? as f32,
        None => 1e-5,
    };
    let negative_slope = match kw
        .get("nonlin_kwargs")
        .and_then(Value::as_object)
        .and_then(|k| k.get("negative_slope"))
    {
        Some(v) => as_f64(v, "nonlin_kwargs.negative_slope")? as f32,
        None => 0.01,
    };
    let kernel = |v: &Value, w: &str| triple(v, w, as_usize);
    let plan = NetworkPlan {
        in_channels,
        classes,
        features: per_stage(
            field(kw, "features_per_stage", what)?,
            stages,
            "features_per_stage",
            as_usize,
        )?,
        kernel_sizes: per_stage(
            field(kw, "kernel_sizes", what)?,
            stages,
            "kernel_sizes",
            kernel,
        )?,
        strides: per_stage(field(kw, "strides", what)?, stages, "strides", kernel)?,
        convs_per_stage: per_stage(
            field(kw, "n_conv_per_stage", what)?,
            stages,
            "n_conv_per_stage",
            as_usize,
        )?,
        convs_per_decoder_stage: per_stage(
            field(kw, "n_conv_per_stage_decoder", what)?,
            stages - 1,
            "n_conv_per_stage_decoder",
            as_usize,
        )?,
        conv_bias: kw
            .get("conv_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        norm_eps,
        negative_slope,
    };
    let zero = |v: &[usize]| v.contains(&0);
    if zero(&plan.features)
        || zero(&plan.convs_per_stage)
        || zero(&plan.convs_per_decoder_stage)
        || plan
            .kernel_sizes
            .iter()
            .chain(&plan.strides)
            .any(|k| zero(k))
    {
        return Err(plans_err(
            "features, kernel sizes, strides and conv counts must be positive",
        ));
    }
    Ok(plan)
}

impl NetworkPlan {
    pub fn stages(&self) -> usize {
        self.features.len()
    }

    /// Channels of the penultimate features (output of `decoder.stages[-1]`).
    pub fn feature_channels(&self) -> usize {
        self.features[0]
    }

    /// The product of the strides per axis: a patch must be a multiple of it.
    pub fn total_stride(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.strides.iter().map(|s| s[a]).product())
    }

    /// Multiply-accumulates of one forward pass over a `patch` (a multiple of `total_stride`),
    /// counted as nnunet-inference.md §5.2 does: a convolution costs out_voxels·Cout·Cin·∏k, a
    /// transposed convolution out_voxels·Cin·Cout; norms and activations are not counted.
    pub fn macs(&self, patch: [usize; 3]) -> u64 {
        self.step_macs(patch).iter().map(|(_, macs)| macs).sum()
    }

    /// `macs` per step of the forward pass, in the order the network runs them.
    pub fn step_macs(&self, patch: [usize; 3]) -> Vec<(NetworkStep, u64)> {
        let mut extent = patch;
        let mut extents = Vec::with_capacity(self.stages());
        for stride in &self.strides {
            extent = [0, 1, 2].map(|a| extent[a] / stride[a]);
            extents.push(extent.iter().product::<usize>() as u64);
        }
        let (f, k) = (&self.features, &self.kernel_sizes);
        let taps = |s: usize| k[s].iter().product::<usize>() as u64;
        let mut steps = Vec::with_capacity(3 * self.stages());
        let mut cin = self.in_channels as u64;
        for s in 0..self.stages() {
            let cout = f[s] as u64;
            let convs = self.convs_per_stage[s] as u64;
            let macs = extents[s] * cout * taps(s) * (cin + cout * (convs - 1));
            steps.push((NetworkStep::Encoder(s), macs));
            cin = cout;
        }
        // Decoder stage j brings stage s = stages − 1 − j up to stage s − 1's resolution.
        for (j, &convs) in self.convs_per_decoder_stage.iter().enumerate() {
            let s = self.stages() - 1 - j;
            let (below, here) = (f[s] as u64, f[s - 1] as u64);
            let voxels = extents[s - 1];
            steps.push((NetworkStep::Upsample(j), voxels * below * here));
            let macs = voxels * here * taps(s - 1) * (2 * here + here * (convs as u64 - 1));
            steps.push((NetworkStep::Decoder(j), macs));
        }
        steps.push((
            NetworkStep::SegLayer,
            extents[0] * f[0] as u64 * self.classes as u64,
        ));
        steps
    }

    /// Every tensor of the network's state dict (aliases dropped) with its shape, as PyTorch
    /// names and stores them.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let s = self.stages();
        let f = &self.features;
        let mut out = Vec::new();
        let mut conv = |prefix: String, cout: usize, cin: usize, k: [usize; 3]| {
            out.push((
                format!("{prefix}.conv.weight"),
                vec![cout, cin, k[0], k[1], k[2]],
            ));
            if self.conv_bias {
                out.push((format!("{prefix}.conv.bias"), vec![cout]));
            }
            out.push((format!("{prefix}.norm.weight"), vec![cout]));
            out.push((format!("{prefix}.norm.bias"), vec![cout]));
        };
        for stage in 0..s {
            for j in 0..self.convs_per_stage[stage] {
                let cin = match (stage, j) {
                    (0, 0) => self.in_channels,
                    (_, 0) => f[stage - 1],
                    _ => f[stage],
                };
                conv(
                    format!("encoder.stages.{stage}.0.convs.{j}"),
                    f[stage],
                    cin,
                    self.kernel_sizes[stage],
                );
            }
        }
        for t in 0..s - 1 {
            let skip = s - 2 - t;
            for j in 0..self.convs_per_decoder_stage[t] {
                let cin = if j == 0 { 2 * f[skip] } else { f[skip] };
                conv(
                    format!("decoder.stages.{t}.convs.{j}"),
                    f[skip],
                    cin,
                    self.kernel_sizes[skip],
                );
            }
        }
        for t in 0..s - 1 {
            let (below, skip) = (s - 1 - t, s - 2 - t);
            let st = self.strides[below];
            out.push((
                format!("decoder.transpconvs.{t}.weight"),
                vec![f[below], f[skip], st[0], st[1], st[2]],
            ));
            if self.conv_bias {
                out.push((format!("decoder.transpconvs.{t}.bias"), vec![f[skip]]));
            }
            out.push((
                format!("decoder.seg_layers.{t}.weight"),
                vec![self.classes, f[skip], 1, 1, 1],
            ));
            out.push((format!("decoder.seg_layers.{t}.bias"), vec![self.classes]));
        }
        out
    }
}

/// Reads dataset.json: input channels (`channel_names`, or the older `modality`) and classes.
pub fn dataset_info(dataset: &Value) -> Result<DatasetInfo> {
    let channels = dataset
        .get("channel_names")
        .or_else(|| dataset.get("modality"))
        .and_then(Value::as_object)
        .ok_or_else(|| plans_err("dataset.json has no `channel_names` object"))?;
    let mut channel_names = vec![String::new(); channels.len()];
    for (index, name) in channels {
        let i: usize = index
            .parse()
            .ok()
            .filter(|&i| i < channels.len())
            .ok_or_else(|| {
                plans_err(format!(
                    "dataset.json channel index `{index}` is not 0..{}",
                    channels.len()
                ))
            })?;
        channel_names[i] = name.as_str().unwrap_or_default().to_string();
    }
    let labels = dataset
        .get("labels")
        .and_then(Value::as_object)
        .ok_or_else(|| plans_err("dataset.json has no `labels` object"))?;
    let mut class_names = vec![None; labels.len()];
    for (name, value) in labels {
        if name == "ignore" {
            return Err(plans_err(
                "datasets with an `ignore` label are not supported yet",
            ));
        }
        let v = value
            .as_u64()
            .map(|v| v as usize)
            .filter(|&v| v < labels.len())
            .ok_or_else(|| {
                plans_err(format!(
                    "label `{name}` = {value}: only plain labels 0..{} are supported (no regions)",
                    labels.len()
                ))
            })?;
        if class_names[v].replace(name.clone()).is_some() {
            return Err(plans_err(format!("label value {v} is used twice")));
        }
    }
    Ok(DatasetInfo {
        channel_names,
        class_names: class_names
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect(),
    })
}

/// Reads configuration `name` of the plans for a dataset.
pub fn configuration_plan(
    plans: &Value,
    name: &str,
    dataset: &DatasetInfo,
) -> Result<ConfigurationPlan> {
    let raw = resolve_configuration(plans, name, &mut Vec::new())?;
    let arch = architecture(&raw)?;
    let network = network_plan(
        &arch,
        dataset.channel_names.len(),
        dataset.class_names.len(),
    )?;
    let patch_size = triple(field(&raw, "patch_size", name)?, "patch_size", as_usize)?;
    let spacing = triple(field(&raw, "spacing", name)?, "spacing", as_f64)?;
    let transpose_forward = match plans.get("transpose_forward") {
        Some(v) => triple(v, "transpose_forward", as_usize)?,
        None => [0, 1, 2],
    };
    let mut sorted = transpose_forward;
    sorted.sort_unstable();
    if sorted != [0, 1, 2] {
        return Err(plans_err(format!(
            "`transpose_forward` {transpose_forward:?} is not a permutation"
        )));
    }
    let total = network.total_stride();
    if (0..3).any(|a| patch_size[a] == 0 || !patch_size[a].is_multiple_of(total[a])) {
        return Err(plans_err(format!(
            "patch size {patch_size:?} is not a multiple of the network's total stride {total:?}"
        )));
    }
    Ok(ConfigurationPlan {
        name: name.to_string(),
        patch_size,
        spacing,
        transpose_forward,
        network,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nnU-Net's default 6-stage PlainConvUNet (features 32…320, 2 convs per stage).
    fn msd_plan(
        classes: usize,
        kernel_sizes: Vec<[usize; 3]>,
        strides: Vec<[usize; 3]>,
    ) -> NetworkPlan {
        NetworkPlan {
            in_channels: 1,
            classes,
            features: vec![32, 64, 128, 256, 320, 320],
            kernel_sizes,
            strides,
            convs_per_stage: vec![2; 6],
            convs_per_decoder_stage: vec![2; 5],
            conv_bias: true,
            norm_eps: 1e-5,
            negative_slope: 0.01,
        }
    }

    #[test]
    fn macs_match_the_design_notes_flop_table() {
        // nnunet-inference.md §5.2: generic 128³ 954.5 GFLOP, MSD Pancreas 40×224×224 1074.
        let generic = msd_plan(
            2,
            vec![[3, 3, 3]; 6],
            [[1, 1, 1]].into_iter().chain([[2, 2, 2]; 5]).collect(),
        );
        let gflop = 2.0 * generic.macs([128, 128, 128]) as f64 / 1e9;
        assert!((gflop - 954.5).abs() < 0.1, "generic 128³: {gflop} GFLOP");
        let mut kernels = vec![[3, 3, 3]; 6];
        kernels[0] = [1, 3, 3];
        let pancreas = msd_plan(
            3,
            kernels,
            vec![
                [1, 1, 1],
                [1, 2, 2],
                [2, 2, 2],
                [2, 2, 2],
                [2, 2, 2],
                [1, 2, 2],
            ],
        );
        let gflop = 2.0 * pancreas.macs([40, 224, 224]) as f64 / 1e9;
        assert!((gflop - 1074.0).abs() < 0.5, "pancreas: {gflop} GFLOP");
    }
}
