//! `berth completions` and `berth man`: shell completions and manual pages generated from
//! the command line's own definitions, so that they never drift from it.
use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use roff::{Roff, bold, italic, roman};

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct ManArgs {
    /// Where to write the pages: berth.1, one berth-SUBCOMMAND.1 per subcommand,
    /// berth-docker-proxy.1 and berth.toml.5.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// Prints the completion script for `args.shell` (e.g. `berth completions bash >
/// /usr/share/bash-completion/completions/berth`).
pub(crate) fn completions(args: &CompletionsArgs) -> ExitCode {
    let mut cmd = crate::Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "berth", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Writes every manual page into `args.dir`.
pub(crate) fn man(args: &ManArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let write = |name: &str, page: String| -> anyhow::Result<()> {
        let path = args.dir.join(name);
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(page.as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))
    };
    clap_mangen::generate_to(crate::Cli::command(), &args.dir)
        .with_context(|| format!("cannot write the pages into {}", args.dir.display()))?;
    write("berth-docker-proxy.1", docker_proxy_page())?;
    write("berth.toml.5", config_page())?;
    Ok(ExitCode::SUCCESS)
}

fn version() -> String {
    format!("berth {}", env!("CARGO_PKG_VERSION"))
}

/// A verbatim block (no filling, no hyphenation).
fn verbatim(page: &mut Roff, text: &str) {
    page.control("nf", []);
    for line in text.lines() {
        page.text([roman(line)]);
    }
    page.control("fi", []);
}

/// berth-docker-proxy(1): its usage text is the reference (the parser follows Go's `flag`
/// rules and is not clap's).
fn docker_proxy_page() -> String {
    let mut page = Roff::new();
    page.control(
        "TH",
        ["BERTH-DOCKER-PROXY", "1", "", &version(), "User Commands"],
    )
    .control("SH", ["NAME"])
    .text([roman(
        "berth-docker-proxy - a drop-in for docker-proxy that hands Docker's ports to berth",
    )])
    .control("SH", ["SYNOPSIS"])
    .text([
        bold("berth-docker-proxy"),
        roman(" "),
        bold("-proto"),
        roman(" "),
        italic("tcp|udp"),
        roman(" "),
        bold("-host-ip"),
        roman(" "),
        italic("IP"),
        roman(" "),
        bold("-host-port"),
        roman(" "),
        italic("PORT"),
        roman(" "),
        bold("-container-ip"),
        roman(" "),
        italic("IP"),
        roman(" "),
        bold("-container-port"),
        roman(" "),
        italic("PORT"),
        roman(" ["),
        bold("-use-listen-fd"),
        roman("]"),
    ])
    .control("SH", ["DESCRIPTION"])
    .text([roman(
        "dockerd runs one userland proxy per published port, protocol and address family. \
         Set \"userland-proxy-path\" in /etc/docker/daemon.json to this program and each of \
         them hands its port to the berth daemon (berth run), which serves every port in one \
         process with metrics and status; without a daemon it serves the port itself.",
    )])
    .control("SH", ["OPTIONS"]);
    verbatim(&mut page, berth::docker_proxy::USAGE);
    page.control("SH", ["SEE ALSO"]).text([
        bold("berth"),
        roman("(1), "),
        bold("berth-run"),
        roman("(1), "),
        bold("berth.toml"),
        roman("(5)"),
    ]);
    page.render()
}

/// berth.toml(5): the shipped, commented example is the reference.
fn config_page() -> String {
    let mut page = Roff::new();
    page.control("TH", ["BERTH.TOML", "5", "", &version(), "File Formats"])
        .control("SH", ["NAME"])
        .text([roman("berth.toml - the configuration of berth run")])
        .control("SH", ["SYNOPSIS"])
        .text([roman("/etc/berth/berth.toml")])
        .control("SH", ["DESCRIPTION"])
        .text([roman(
            "A TOML file: [service], [admin], [metrics], [dnat], [sockmap] and [defaults] \
             tables, and any number of [[mapping]] tables, each a port berth serves. Every \
             mapping goes through the same validator as berth forward's flags and the runtime \
             API's requests; a mistake names the file, the mapping and the field, and nothing \
             starts. Check a file with berth check; apply a changed one with berth reload (or \
             SIGHUP): unchanged mappings are untouched, changed ones are replaced on the same \
             socket, removed ones drain.",
        )])
        .control("SH", ["EXAMPLE"])
        .text([roman(
            "The file berth installs, with every field and its default (commented out where \
             the default applies):",
        )]);
    verbatim(&mut page, include_str!("../../../dist/berth.toml"));
    page.control("SH", ["SEE ALSO"]).text([
        bold("berth"),
        roman("(1), "),
        bold("berth-run"),
        roman("(1), "),
        bold("berth-check"),
        roman("(1)"),
    ]);
    page.render()
}

#[cfg(test)]
mod tests {
    use berth::mapping::Draft;

    use super::*;

    /// Every field a mapping takes is in berth.toml(5): the struct literal lists them all,
    /// so a new field fails to compile here until it is shown too.
    #[test]
    fn the_config_page_shows_every_mapping_field() {
        let every = Draft {
            name: Some(String::new()),
            proto: Some(String::new()),
            listen: Some(String::new()),
            target: Some(String::new()),
            mode: Some(String::new()),
            max_connections: Some(0),
            connect_timeout: Some(0.0),
            max_connections_per_client: Some(0),
            tcp_idle_timeout: Some(0.0),
            udp_idle_timeout: Some(0.0),
            max_flows: Some(0),
            udp_batch: Some(0),
            udp_offload: Some(false),
            relay: Some(false),
        };
        let page = config_page();
        let fields = serde_json::to_value(&every).unwrap();
        for field in fields.as_object().unwrap().keys() {
            assert!(
                page.contains(field.as_str()),
                "berth.toml(5) does not show {field}"
            );
        }
    }

    #[test]
    fn the_docker_proxy_page_has_every_flag() {
        let page = docker_proxy_page();
        for flag in [
            "-proto",
            "-host-ip",
            "-host-port",
            "-container-ip",
            "-container-port",
        ] {
            // roff writes a hyphen as `\-`.
            assert!(page.contains(&flag.replace('-', "\\-")), "{flag}");
        }
        assert!(page.contains("\n.TH BERTH-DOCKER-PROXY 1 "), "{page}");
    }
}
