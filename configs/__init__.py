"""The built-in configs, one YAML file per experiment (`iterjax list`); a
package so that the lab finds them through `importlib.resources`."""
