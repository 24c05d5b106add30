//! Reflector configuration: `--blk` one-liners and the TOML file, both
//! checked before anything starts. Errors name the option or the file, line
//! and key at fault.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default driver image for block devices.
pub const DEFAULT_BLK_DRIVER: &str = "blk";
/// Default driver VM RAM: the block driver needs well under a megabyte;
/// unused pages cost nothing.
pub const DEFAULT_DRIVER_MEMORY: &str = "16M";

/// A configuration error, ready to print.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// One block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// Name (driver VM name, logs, device id).
    pub name: String,
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Disk image file.
    pub image: PathBuf,
    /// Create the image with this size if it does not exist.
    pub size: Option<u64>,
    /// Driver image (built-in name or path).
    pub driver: String,
    /// Driver VM RAM.
    pub driver_memory: String,
    /// Refuse writes.
    pub read_only: bool,
    /// Pending requests with no progress for this long mean a hung driver VM.
    pub hang_deadline: std::time::Duration,
    /// Driver VM faults tolerated per 10 s before the device fails.
    pub fault_budget: u32,
    /// Keep a booted driver VM waiting to replace a failed one.
    pub warm_spare: bool,
}

/// Everything the reflector serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Block devices.
    pub blk: Vec<BlkConfig>,
    /// The vmm binary, if not next to the reflector.
    pub vmm: Option<PathBuf>,
}

/// Parses a size: bytes, or with a K/M/G/T suffix (binary).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        Some((i, 't' | 'T')) => (&text[..i], 40),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size such as 512M or 4G"))?;
    let bytes = value.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("{text:?} must be a nonzero multiple of 512 bytes"));
    }
    Ok(bytes)
}

fn parse_millis(text: &str) -> Result<std::time::Duration, String> {
    match text.parse::<u64>() {
        Ok(ms) if (10..=600_000).contains(&ms) => Ok(std::time::Duration::from_millis(ms)),
        _ => Err(format!("{text:?}: expected milliseconds between 10 and 600000")),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" | "" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={value}: expected on or off")),
    }
}

/// Parses `socket=PATH,image=PATH[,size=SIZE][,driver=IMAGE][,readonly=on][,name=NAME][,memory=SIZE]`;
/// `index` names the device when no name is given.
pub fn parse_blk(spec: &str, index: usize) -> Result<BlkConfig, ConfigError> {
    let error = |reason: String| ConfigError(format!("--blk {spec:?}: {reason}"));
    let mut config = BlkConfig {
        name: format!("blk{index}"),
        socket: PathBuf::new(),
        image: PathBuf::new(),
        size: None,
        driver: DEFAULT_BLK_DRIVER.into(),
        driver_memory: DEFAULT_DRIVER_MEMORY.into(),
        read_only: false,
        hang_deadline: crate::blk::device::DEFAULT_HANG_DEADLINE,
        fault_budget: crate::blk::recovery::RestartPolicy::default().budget,
        warm_spare: false,
    };
    for item in spec.split(',') {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match key {
            "socket" => config.socket = PathBuf::from(value),
            "image" => config.image = PathBuf::from(value),
            "size" => config.size = Some(parse_size(value).map_err(|e| error(format!("size: {e}")))?),
            "driver" => config.driver = value.into(),
            "memory" => config.driver_memory = value.into(),
            "name" => config.name = value.into(),
            "readonly" => config.read_only = parse_bool(key, value).map_err(error)?,
            "spare" => config.warm_spare = parse_bool(key, value).map_err(error)?,
            "hang_ms" => config.hang_deadline = parse_millis(value).map_err(|e| error(format!("hang_ms: {e}")))?,
            "fault_budget" => {
                config.fault_budget = value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| error(format!("fault_budget={value}: expected a positive number")))?
            }
            _ => {
                return Err(error(format!(
                    "unknown key {key:?} (known: socket, image, size, driver, memory, name, readonly, spare, hang_ms, fault_budget)"
                )))
            }
        }
    }
    check(&config).map_err(error)?;
    Ok(config)
}

fn check(config: &BlkConfig) -> Result<(), String> {
    if config.socket.as_os_str().is_empty() {
        return Err("socket=PATH is required".into());
    }
    if config.image.as_os_str().is_empty() {
        return Err("image=PATH is required".into());
    }
    if config.name.is_empty() || !config.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("name {:?}: use letters, digits, - and _", config.name));
    }
    if config.driver.is_empty() {
        return Err("driver must not be empty".into());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    vmm: Option<PathBuf>,
    #[serde(default)]
    blk: Vec<toml::Spanned<FileBlk>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBlk {
    name: Option<String>,
    socket: PathBuf,
    image: PathBuf,
    size: Option<toml::Spanned<String>>,
    driver: Option<String>,
    driver_memory: Option<String>,
    #[serde(default)]
    readonly: bool,
    hang_ms: Option<toml::Spanned<u64>>,
    fault_budget: Option<u32>,
    #[serde(default)]
    spare: bool,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Reads a TOML configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read configuration file {}: {e}", path.display())))?;
    parse_file(&text, &path.display().to_string())
}

/// Parses a TOML configuration; `origin` names it in errors.
pub fn parse_file(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|span| format!(", line {}", line_of(text, span.start))).unwrap_or_default();
        ConfigError(format!("{origin}{line}: {}", e.message()))
    })?;
    let mut config = Config { blk: Vec::new(), vmm: file.vmm };
    for (index, spanned) in file.blk.into_iter().enumerate() {
        let line = line_of(text, spanned.span().start);
        let blk = spanned.into_inner();
        let size = match blk.size {
            Some(size) => Some(parse_size(size.get_ref()).map_err(|e| {
                ConfigError(format!("{origin}, line {}: [[blk]] key `size`: {e}", line_of(text, size.span().start)))
            })?),
            None => None,
        };
        let hang_deadline = match blk.hang_ms {
            Some(ms) => parse_millis(&ms.get_ref().to_string()).map_err(|e| {
                ConfigError(format!("{origin}, line {}: [[blk]] key `hang_ms`: {e}", line_of(text, ms.span().start)))
            })?,
            None => crate::blk::device::DEFAULT_HANG_DEADLINE,
        };
        let device = BlkConfig {
            warm_spare: blk.spare,
            hang_deadline,
            fault_budget: blk
                .fault_budget
                .filter(|n| *n > 0)
                .unwrap_or(crate::blk::recovery::RestartPolicy::default().budget),
            name: blk.name.unwrap_or_else(|| format!("blk{index}")),
            socket: blk.socket,
            image: blk.image,
            size,
            driver: blk.driver.unwrap_or_else(|| DEFAULT_BLK_DRIVER.into()),
            driver_memory: blk.driver_memory.unwrap_or_else(|| DEFAULT_DRIVER_MEMORY.into()),
            read_only: blk.readonly,
        };
        check(&device).map_err(|e| ConfigError(format!("{origin}, line {line}: [[blk]]: {e}")))?;
        config.blk.push(device);
    }
    Ok(config)
}

impl Config {
    /// Checks what no single device can: unique names and sockets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.blk.is_empty() {
            return Err(ConfigError("nothing to serve: give --blk or --config (see reflector serve --help)".into()));
        }
        for (i, a) in self.blk.iter().enumerate() {
            for b in &self.blk[i + 1..] {
                if a.name == b.name {
                    return Err(ConfigError(format!("two devices are named {:?}", a.name)));
                }
                if a.socket == b.socket {
                    return Err(ConfigError(format!("two devices use socket {}", a.socket.display())));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blk_one_liner() {
        let c = parse_blk("socket=/tmp/a.sock,image=/tmp/a.img,size=64M,readonly=on,name=disk", 0).unwrap();
        assert_eq!(c.socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.size, Some(64 << 20));
        assert!(c.read_only);
        assert_eq!(c.name, "disk");
        assert_eq!(c.driver, "blk");
        let d = parse_blk("socket=/s,image=/i", 3).unwrap();
        assert_eq!((d.name.as_str(), d.read_only, d.size), ("blk3", false, None));
        for bad in [
            "image=/i",
            "socket=/s",
            "socket=/s,image=/i,size=12Q",
            "socket=/s,image=/i,size=100",
            "socket=/s,image=/i,colour=red",
            "socket=/s,image=/i,readonly=maybe",
            "socket=/s,image=/i,name=a b",
        ] {
            let error = parse_blk(bad, 0).unwrap_err().0;
            assert!(error.starts_with("--blk"), "{error}");
        }
    }

    #[test]
    fn toml_file_and_its_errors_name_the_line_and_key() {
        let text = "vmm = \"/opt/vmm\"\n\n[[blk]]\nname = \"disk0\"\nsocket = \"/tmp/d0.sock\"\nimage = \"/tmp/d0.img\"\nsize = \"1G\"\n";
        let config = parse_file(text, "r.toml").unwrap();
        assert_eq!(config.vmm, Some(PathBuf::from("/opt/vmm")));
        assert_eq!(config.blk[0].size, Some(1 << 30));
        assert_eq!(config.blk[0].name, "disk0");

        let bad_size = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nsize = \"lots\"\n";
        let error = parse_file(bad_size, "r.toml").unwrap_err().0;
        assert!(error.contains("r.toml, line 4") && error.contains("size"), "{error}");

        let unknown = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nspeed = 3\n";
        let error = parse_file(unknown, "r.toml").unwrap_err().0;
        assert!(error.contains("r.toml, line 4") && error.contains("speed"), "{error}");

        let missing = "[[blk]]\nsocket = \"/s\"\n";
        let error = parse_file(missing, "r.toml").unwrap_err().0;
        assert!(error.contains("image"), "{error}");

        let wrong_type = "[[blk]]\nsocket = \"/s\"\nimage = \"/i\"\nreadonly = \"yes\"\n";
        let error = parse_file(wrong_type, "r.toml").unwrap_err().0;
        assert!(error.contains("line 4"), "{error}");
    }

    #[test]
    fn duplicates_and_emptiness_are_refused() {
        assert!(Config::default().validate().is_err());
        let a = parse_blk("socket=/s,image=/i,name=x", 0).unwrap();
        let b = parse_blk("socket=/t,image=/j,name=x", 1).unwrap();
        assert!(Config { blk: vec![a.clone(), b], vmm: None }.validate().is_err());
        let c = parse_blk("socket=/s,image=/j,name=y", 1).unwrap();
        assert!(Config { blk: vec![a, c], vmm: None }.validate().is_err());
    }
}
