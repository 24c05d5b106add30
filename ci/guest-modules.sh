# Sourced by the scripts that boot the e2e kernel with modules of their own
# (e2e-vfio.sh, e2e-cgroup2.sh); bash, needs die().
#
# stage_modules MODDIR DEST NAME...: copies the kernel modules NAME... and
# every module they depend on from MODDIR (the kernel's lib/modules/RELEASE)
# into DEST, decompressed, and writes their load order to DEST/order.
# Modules built into the kernel are skipped.
stage_modules() {
    local moddir=$1 dest=$2 m
    shift 2
    local -a order=()
    local -A seen=()
    mkdir -p "$dest"
    for m in "$@"; do _stage_module "$m"; done
    printf '%s\n' "${order[@]}" >"$dest/order"
}

# One module and, first, its dependencies (stage_modules' locals in scope).
_stage_module() {
    local name=${1//-/_} f='' m b deps d
    [[ -n ${seen[$name]:-} ]] && return 0
    seen[$name]=1
    grep -q "/${name}.ko" <(sed 's/-/_/g' "$moddir/modules.builtin") && return 0
    while IFS= read -r m; do
        b=${m##*/}
        b=${b%%.ko*}
        [[ -z $f && ${b//-/_} == "$name" ]] && f=$m
    done < <(find "$moddir/kernel" -name '*.ko*')
    [[ -n $f ]] || die "kernel module $name not found under $moddir"
    case $f in
    *.ko.xz) xz -dc "$f" >"$dest/$name.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$dest/$name.ko" ;;
    *) cp "$f" "$dest/$name.ko" ;;
    esac
    deps=$(tr '\0' '\n' <"$dest/$name.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' ')
    for d in $deps; do _stage_module "$d"; done
    order+=("$name")
}
