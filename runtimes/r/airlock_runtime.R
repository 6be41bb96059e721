# Airlock's R runtime shim: the sandboxed end of the data protocol, R side.
#
# The sandbox runs `R --vanilla --no-echo -f PREFIX/shim/airlock_runtime.R` as an
# unprivileged uid, with fds 0-2 on /dev/null and fd 3 a connected Unix stream socket
# to the Postgres backend (crates/airlock-protocol/src/data.rs is authoritative):
#
#     backend                                  runtime
#       start{script, names, limits}  ───────►
#       Arrow(batch) *                ───────►   input rows
#       input_end                     ───────►
#                                     ◄───────   print{text} *
#                                     ◄───────   Arrow(batch) *   output rows, one schema
#                                     ◄───────   done{rows} | script_error{...}
#
# The Rust bridge (PREFIX/lib/libairlock_r.so, runtimes/r/bridge) does the socket, the
# framing, the protocol version check (version 3), the Arrow <-> R conversions by
# declared type (docs/TYPES.md) and the forwarding of printed output. This file runs the
# script, catches its conditions and call stack, and picks the exit status:
# 0 done, 1 the script or its output failed, 2 the input or the protocol failed.
#
# $AIRLOCK_R_BRIDGE overrides the bridge's path (tests load a freshly built one).

local({
    EXIT_OK <- 0L
    EXIT_SCRIPT <- 1L
    EXIT_INPUT <- 2L

    shim_path <- function() {
        args <- commandArgs(trailingOnly = FALSE)
        file <- sub("^--file=", "", args[startsWith(args, "--file=")])
        f <- which(args == "-f")
        if (length(f) && f[1] < length(args)) file <- c(file, args[f[1] + 1L])
        if (length(file)) file[1] else NA_character_
    }

    bridge_path <- function() {
        p <- Sys.getenv("AIRLOCK_R_BRIDGE", "")
        if (nzchar(p)) return(p)
        shim <- shim_path()
        if (!is.na(shim)) {
            return(file.path(dirname(dirname(normalizePath(shim))), "lib", "libairlock_r.so"))
        }
        "/opt/airlock/runtimes/r/lib/libairlock_r.so"
    }

    dll <- NULL

    # Calls the bridge; its errors come back as values and are raised here as R
    # conditions of the class the bridge names (ProtocolError, InputError, ...).
    bcall <- function(name, ...) {
        r <- .Call(getNativeSymbolInfo(paste0("wrap__", name), dll), ...)
        if (inherits(r, "airlock_bridge_error")) {
            kind <- attr(r, "kind")
            stop(structure(
                class = c(kind, "airlock_bridge_error", "error", "condition"),
                list(message = as.character(unclass(r)), call = NULL)
            ))
        }
        r
    }

    text1 <- function(x) {
        x <- paste(as.character(x), collapse = "\n")
        if (is.na(x)) "NA" else enc2utf8(x)
    }

    failure <- function(phase, type, message, traceback, status) {
        list(error = list(phase = phase, type = text1(type), message = text1(message),
                          traceback = text1(traceback)),
             status = status)
    }

    report <- function(f) {
        try(bcall("airlock_send_error", f$error$phase, f$error$type, f$error$message,
                  f$error$traceback), silent = TRUE)
        f$status
    }

    # "a list", "numeric", "character", "a function", ...
    describe <- function(x) {
        if (is.null(x)) return("NULL")
        if (is.function(x)) return("a function")
        cls <- class(x)
        if (identical(cls, "list")) return("a list")
        cls[1]
    }

    # Where the script starts on the call stack; its frames are the ones above.
    airlock_eval <- function(exprs) eval(exprs, envir = globalenv())
    # The call R names for a condition raised at the script's top level.
    top_level_call <- quote(eval(exprs, envir = globalenv()))

    # A condition's call, unless it is the script's top level (R prints none there).
    script_call <- function(cond) {
        call <- conditionCall(cond)
        if (is.null(call) || identical(call, top_level_call)) NULL else call
    }

    format_call <- function(call) {
        text <- paste(deparse(call, width.cutoff = 100L, nlines = 1L), collapse = "")
        sr <- attr(call, "srcref")
        if (!is.null(sr)) text <- sprintf("%s at line %d", text, as.integer(sr[[1]]))
        text
    }

    # Loopback queries: run by the waiting backend as the calling role, in its
    # transaction. A failed statement is an R error of class airlock_query_error
    # with fields sqlstate, detail and hint.
    loopback <- function(sql, mode, params) {
        if (!is.character(sql) || length(sql) != 1L || is.na(sql)) {
            stop("sql must be one character string")
        }
        if (!is.null(params) && !is.list(params)) params <- as.list(params)
        r <- bcall("airlock_loopback", enc2utf8(sql), mode, params)
        if (inherits(r, "airlock_query_failure")) {
            stop(structure(
                class = c("airlock_query_error", "error", "condition"),
                list(message = sprintf("%s (SQLSTATE %s)", r$message, r$sqlstate),
                     call = sys.call(-1), sqlstate = r$sqlstate, detail = r$detail,
                     hint = r$hint)
            ))
        }
        r
    }

    # Runs the script; NULL, or a failure with the condition and the script's frames.
    run_script <- function(exprs) {
        tb <- ""
        on_error <- function(e) {
            calls <- sys.calls()
            n <- length(calls)
            top <- NA_integer_
            for (i in seq_len(n)) {
                if (identical(sys.function(i), airlock_eval)) top <- i
            }
            if (is.na(top)) return()
            hidden <- vapply(seq_len(n), function(i) {
                f <- sys.function(i)
                identical(f, .handleSimpleError) || identical(f, on_error)
            }, logical(1))
            # top + 1 and top + 2 are eval()'s own frames.
            keep <- seq_len(n)
            keep <- keep[keep > top + 2L & !hidden]
            # A failed loopback statement: the script's call is the last frame shown,
            # not the shim's own below it.
            inner <- keep[vapply(keep, function(i) identical(sys.function(i), loopback),
                                 logical(1))]
            if (length(inner)) keep <- keep[keep < inner[1]]
            lines <- vapply(keep, function(i) format_call(calls[[i]]), "")
            # A builtin that failed (log("a")) has no frame of its own.
            cc <- script_call(e)
            bare <- function(x) {
                attributes(x) <- NULL
                x
            }
            shown <- any(vapply(calls[keep], function(k) identical(bare(k), bare(cc)), logical(1)))
            if (!is.null(cc) && !shown) {
                lines <- c(lines, format_call(cc))
            }
            if (length(lines)) {
                tb <<- paste0(rev(sprintf("%d: %s", seq_along(lines), lines)), collapse = "\n")
            }
        }
        on_warning <- function(w) {
            call <- script_call(w)
            msg <- conditionMessage(w)
            text <- if (is.null(call)) msg else
                paste0("In ", paste(deparse(call, nlines = 1L), collapse = ""), " : ", msg)
            cat("Warning message:\n", text, "\n", sep = "", file = stderr())
            invokeRestart("muffleWarning")
        }
        r <- tryCatch(
            withCallingHandlers(
                {
                    airlock_eval(exprs)
                    NULL
                },
                error = on_error, warning = on_warning
            ),
            error = function(e) e
        )
        if (inherits(r, "error")) {
            return(failure("script", class(r)[1], conditionMessage(r), tb, EXIT_SCRIPT))
        }
        NULL
    }

    # A POSIXct declared `timestamp` goes out as its wall-clock time in its own zone: the
    # bridge sends the UTC reading, so shift other zones by their offset first.
    wall_clock <- function(x, type) {
        if (type == "timestamp[]" && is.list(x)) return(lapply(x, wall_clock, type = "timestamp"))
        if (type != "timestamp" || !inherits(x, "POSIXct")) return(x)
        tz <- attr(x, "tzone")
        tz <- if (is.null(tz)) "" else tz[1]
        if (tz %in% c("UTC", "GMT", "Etc/UTC", "Etc/GMT")) return(x)
        off <- as.POSIXlt(x)$gmtoff
        off[is.na(off)] <- 0
        structure(as.numeric(x) + off, class = c("POSIXct", "POSIXt"), tzone = "UTC")
    }

    # Sends this run's output; the number of rows, or a failure.
    send_output <- function(start) {
        g <- globalenv()
        if (!is.null(start$output_params)) {
            values <- vector("list", length(start$output_params))
            for (i in seq_along(start$output_params)) {
                name <- start$output_params[[i]]
                type <- start$output_types[[i]]
                if (!exists(name, envir = g, inherits = FALSE)) {
                    return(failure("output", "OutputError",
                                   sprintf("the script did not set %s (named in output_params)", name),
                                   "", EXIT_SCRIPT))
                }
                v <- get(name, envir = g, inherits = FALSE)
                if (endsWith(type, "[]") || (type == "bytea" && is.raw(v))) {
                    v <- list(v)
                } else if (is.null(v)) {
                    v <- NA
                } else if (length(v) != 1L) {
                    return(failure("output", "OutputError",
                                   sprintf("%s has %d values; the column list says %s, which takes one",
                                           name, length(v), type),
                                   "", EXIT_SCRIPT))
                }
                values[i] <- list(wall_clock(v, type))
            }
            r <- tryCatch(bcall("airlock_send_frame", values, 1, "output_params"),
                          error = function(e) e)
        } else {
            name <- start$output_name
            if (!exists(name, envir = g, inherits = FALSE)) {
                return(failure("output", "OutputError", sprintf("the script did not set %s", name),
                               "", EXIT_SCRIPT))
            }
            out <- get(name, envir = g, inherits = FALSE)
            if (!is.data.frame(out)) {
                return(failure("output", "OutputError",
                               sprintf("%s is %s, not a data.frame", name, describe(out)),
                               "", EXIT_SCRIPT))
            }
            cols <- unclass(out)
            attributes(cols) <- NULL
            for (i in seq_len(min(length(cols), length(start$output_types)))) {
                cols[i] <- list(wall_clock(cols[[i]], start$output_types[[i]]))
            }
            r <- tryCatch(bcall("airlock_send_frame", cols, nrow(out), name),
                          error = function(e) e)
        }
        if (inherits(r, "error")) {
            return(failure("output", class(r)[1], conditionMessage(r), "", EXIT_SCRIPT))
        }
        r
    }

    # Every run of the script (one, or one per chunk); list(rows) or a failure.
    run_all <- function(start, exprs) {
        g <- globalenv()
        rows <- 0
        chunk <- 0L
        repeat {
            df <- tryCatch(bcall("airlock_next_input"), error = function(e) e)
            if (inherits(df, "error")) {
                return(failure("input", class(df)[1], conditionMessage(df), "", EXIT_INPUT))
            }
            if (is.null(df)) break
            chunk <- chunk + 1L
            assign(start$input_name, df, envir = g)
            rm(df)
            if (exists(start$output_name, envir = g, inherits = FALSE)) {
                rm(list = start$output_name, envir = g)
            }
            if (!is.null(start$rows_per_read)) assign("airlock_chunk", chunk, envir = g)
            f <- run_script(exprs)
            if (!is.null(f)) return(f)
            sent <- send_output(start)
            if (is.list(sent)) return(sent)
            rows <- rows + sent
        }
        list(rows = rows)
    }

    main <- function() {
        dll <<- tryCatch(dyn.load(bridge_path()), error = function(e) NULL)
        # Without the bridge there is nobody to report to.
        if (is.null(dll)) return(EXIT_INPUT)

        # Loaded before printed output is forwarded: their start-up messages go nowhere.
        # And before the call's start: a sandbox prepared ahead of its call loads them
        # while it waits.
        libs <- tryCatch({
            suppressPackageStartupMessages(library(bit64))
            suppressPackageStartupMessages(loadNamespace("hms"))
            NULL
        }, error = function(e) e)
        if (inherits(libs, "error")) {
            return(report(failure("input", "InputError",
                                  paste("the R runtime cannot load its packages:",
                                        conditionMessage(libs)),
                                  "", EXIT_INPUT)))
        }
        start <- tryCatch(bcall("airlock_start"), error = function(e) e)
        if (inherits(start, "error")) {
            return(report(failure("input", class(start)[1], conditionMessage(start), "",
                                  EXIT_INPUT)))
        }
        for (name in names(start$params)) {
            assign(name, start$params[[name]], envir = globalenv())
        }
        assign("airlock_query", function(sql, params = NULL) loopback(sql, "query", params),
               envir = globalenv())
        assign("airlock_execute", function(sql, params = NULL) loopback(sql, "execute", params),
               envir = globalenv())
        exprs <- tryCatch(parse(text = start$script, keep.source = TRUE),
                          error = function(e) e)
        if (inherits(exprs, "error")) {
            return(report(failure("script", class(exprs)[1], conditionMessage(exprs), "",
                                  EXIT_SCRIPT)))
        }

        begun <- tryCatch(bcall("airlock_print_begin"), error = function(e) e)
        if (inherits(begun, "error")) {
            return(report(failure("output", class(begun)[1], conditionMessage(begun), "",
                                  EXIT_SCRIPT)))
        }
        result <- run_all(start, exprs)
        # Printed output goes out before the outcome, whatever the outcome.
        try(bcall("airlock_print_end"), silent = TRUE)
        if (!is.null(result$error)) return(report(result))
        done <- tryCatch(bcall("airlock_send_done", result$rows), error = function(e) e)
        if (inherits(done, "error")) return(EXIT_SCRIPT)
        EXIT_OK
    }

    status <- tryCatch(main(), error = function(e) {
        # A bug in this file, or the machine ran out of something: still say so.
        if (!is.null(dll)) {
            report(failure("output", "RuntimeFailure",
                           paste("the R runtime failed:", conditionMessage(e)), "",
                           EXIT_SCRIPT))
        } else {
            EXIT_INPUT
        }
    })
    quit(save = "no", status = status, runLast = FALSE)
})
