//! The man page and the shell completions, made from the command line's own definition (so
//! they never drift from it): `cylo-usage generate-docs DIR`, which `cargo xtask dist` runs
//! for the Debian package.
use std::path::Path;

use clap_complete::Shell;

/// Writes `cylo-usage.1` and the bash (`cylo-usage.bash`), zsh (`_cylo-usage`) and fish
/// (`cylo-usage.fish`) completions of `command` into `dir`.
pub(crate) fn generate(mut command: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    std::fs::write(dir.join("cylo-usage.1"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "cylo-usage", dir)?;
    }
    Ok(())
}
