"""Config pieces that ship with the package: what the experiment files in the top-level
`configs/` share (`common`) and the demo config (`demo`, so `jaxser demo` runs from an
installed wheel)."""
